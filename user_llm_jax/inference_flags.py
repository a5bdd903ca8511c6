"""Command-line flags shared by the answering modes (`--mode=generate`, `--mode=infer`).

Defined once here because both job modules are imported before flag parsing (a flag
defined twice is an error) and jobs import no other job.
"""

from __future__ import annotations

from absl import flags

HISTORY_FILE = flags.DEFINE_string(
    "history_file", None,
    "--mode=generate / infer: the users' events, a CSV (userId,movieId|title,rating,"
    "timestamp) or JSON lines (movieId|item_id|title, optional userId, rating, timestamp).")
TOP_K = flags.DEFINE_integer(
    "top_k", 10, "--mode=generate / infer: how many catalogue items to rank for each user.")
OUTPUT = flags.DEFINE_string(
    "output", None,
    "--mode=generate: write the answer as JSON to this file; --mode=infer: the JSON-lines "
    "file of answers (an interrupted run resumes it; default WORKDIR/answers_<input>.jsonl).")
