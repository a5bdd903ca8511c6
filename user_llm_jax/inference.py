"""Answering for users with a trained User-LLM: load it from its workdir, read a history.

Everything comes from the User-LLM workdir (for the main pipeline: its `user_llm` stage):
the architecture and config (`run.json`), the weights (its checkpoint), the tokenizer and
the catalogue vocabulary. Neither the encoder pretraining run nor the LLM's original
weights are read.

A user's history file is a CSV in the MovieLens ratings format
(userId,movieId,rating,timestamp; the first user's rows are used) or JSON lines with
`movieId` (or `item_id`) and optional `rating` and `timestamp` keys; ids are the catalogue's
raw item ids. Ids not in the catalogue are counted and reported; a history with no known
item is refused.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from data_pipelines import records
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.data import schema
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.train import checkpointing

USER_LLM_JOBS = ("train_user_llm",)
MAKE_HINT = ("python -m experiments.main --config=experiments/configs/main.py --workdir=DIR "
             "(or a user_llm_*.py config)")


def _rows(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) pairs of a CSV (header on line 1) or JSON-lines history file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--history_file {path!r} does not exist")
  rows = []
  with open(path, encoding="utf-8-sig") as f:
    if path.endswith((".jsonl", ".json")):
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise records.BadInputError(f"{path}:{line_no}: not a JSON object ({e})") from e
          if not isinstance(row, dict):
            raise records.BadInputError(f"{path}:{line_no}: expected a JSON object, got "
                                        f"{type(row).__name__}")
          rows.append((line_no, row))
      return rows
    # Data rows start on line 2, after the header.
    return [(line_no, row) for line_no, row in enumerate(csv.DictReader(f), 2)]


def history_record(path: str, vocab: schema.Vocabulary) -> dict[str, Any]:
  """The user's events as a schema record, plus a placeholder target after the last event.

  The record also carries `unknown_items` (rows whose id is not in the catalogue).

  Raises:
    BadInputError: an empty file, a row without an item id, a malformed rating or
      timestamp (naming file and line), or no event with a catalogue item.
  """
  by_raw = {it.raw_id: i for i, it in enumerate(vocab.items)}
  rating_ids = {r: i for i, r in enumerate(vocab.ratings) if i >= schema.FIRST_ID}
  rows = _rows(path)
  if not rows:
    raise records.BadInputError(f"{path}: no events (an empty history file)")
  first_user = rows[0][1].get("userId")
  items, ratings, times, cats, lengths, unknown = [], [], [], [], [], []
  for line_no, row in rows:
    if first_user is not None and row.get("userId") != first_user:
      continue
    raw = row.get("movieId", row.get("item_id"))
    if raw is None or not str(raw).strip():
      raise records.BadInputError(
          f"{path}:{line_no}: no 'movieId' (or 'item_id') in {sorted(row)}")
    try:
      rating = float(row.get("rating", 0.0) or 0.0)
      ts = int(float(row.get("timestamp", line_no) or line_no))
    except (TypeError, ValueError) as e:
      raise records.BadInputError(f"{path}:{line_no}: bad rating/timestamp ({e})") from e
    item = by_raw.get(str(raw).strip(), schema.OOV_ID)
    if item == schema.OOV_ID:
      unknown.append(f"{line_no}:{str(raw).strip()}")
    items.append(item)
    ratings.append(rating_ids.get(rating, schema.OOV_ID))
    times.append(ts)
    c = list(vocab.items[item].category_ids) if item >= schema.FIRST_ID else []
    cats.extend(c)
    lengths.append(len(c))
  if all(i == schema.OOV_ID for i in items):
    raise records.BadInputError(
        f"{path}: none of its {len(items)} events names a catalogue item (unknown ids at "
        f"line:id {', '.join(unknown[:5])}); ids must be the dataset's raw item ids")
  order = np.argsort(np.asarray(times), kind="stable")
  split = schema.split_categories(cats, lengths)
  items = [items[i] for i in order] + [schema.PAD_ID]
  ratings = [ratings[i] for i in order] + [schema.PAD_ID]
  times = [times[i] for i in order] + [times[order[-1]]]
  split = [split[i] for i in order] + [[]]
  return {schema.USER_ID: b"you", schema.ITEM_IDS: np.asarray(items, np.int32),
          schema.RATINGS: np.asarray(ratings, np.int32),
          schema.TIMESTAMPS: np.asarray(times, np.int64),
          schema.CATEGORY_IDS: np.asarray([c for cs in split for c in cs], np.int32),
          schema.CATEGORY_LENGTHS: np.asarray([len(cs) for cs in split], np.int32),
          schema.FAVORITE_CATEGORY: np.int32(schema.PAD_ID), "unknown_items": unknown}


def run_dir(workdir: str) -> str:
  """The User-LLM run of `workdir`: itself, or the main pipeline's `user_llm` stage."""
  stage = os.path.join(workdir, "user_llm")
  if not os.path.exists(os.path.join(workdir, runs.RUN_JSON)) and os.path.isdir(stage):
    return stage
  return workdir


def load_trained(workdir: str):
  """(model, tokenizer, vocabulary, run) of the trained User-LLM in `workdir`.

  Raises:
    NotARunError: the workdir holds no trained User-LLM (the message says what to run).
  """
  run = runs.load_run(run_dir(workdir), job=USER_LLM_JOBS, what="trained User-LLM",
                      make=MAKE_HINT)
  model = models.user_llm_from_architecture(run.architecture, seed=0)
  checkpointing.restore_params(model, run.checkpoints)
  return model, run.tokenizer(), run.vocabulary(), run


def answer(model, tokenizer, example: dict[str, np.ndarray], prompt: list[int],
           max_new_tokens: int) -> str:
  """Greedy answer of the User-LLM to `prompt` for the user of `example`."""
  example = dict(example)
  example[ex_lib.TOKENS] = np.asarray(prompt, np.int32)
  example[ex_lib.PROMPT_LENGTH] = np.int32(len(prompt))
  cond = eval_lib.user_llm_conditioner(model, tokenizer.pad_id)(ex_lib.collate([example]))
  return eval_lib.generate(cond, tokenizer, max_new_tokens)[0]
