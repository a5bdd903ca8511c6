r"""`--mode=generate`: a trained User-LLM answers a question about one user's own history.

  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=generate --history_file=my_ratings.csv \
      --question="Which movie should I watch next? Answer with its title."

`--history_file` is a CSV in the MovieLens ratings format (userId,movieId,rating,timestamp;
the first user's rows are used; movieId must be a catalogue id of the prepared dataset,
unknown ids become out-of-vocabulary events) or JSON lines with `movieId` (or `item_id`)
and optional `rating` and `timestamp` keys. The workdir is the User-LLM run's (for the
main pipeline: its `user_llm` stage). The answer is decoded greedily.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from user_llm_jax.data import schema
from user_llm_jax.jobs import train_user_llm as common
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts

_HISTORY_FILE = flags.DEFINE_string(
    "history_file", None, "--mode=generate: the user's events (MovieLens ratings CSV or JSONL).")
_QUESTION = flags.DEFINE_string(
    "question", "Which movie will I rate next? Answer with its exact title.",
    "--mode=generate: the question asked about the user.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "--mode=generate: answer length.")


def _rows(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"--history_file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    if path.endswith((".jsonl", ".json")):
      rows = []
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON object ({e})") from e
      return rows
    return list(csv.DictReader(f))


def history_record(path: str, vocab: schema.Vocabulary) -> dict[str, Any]:
  """The user's events as a schema record, plus a placeholder target after the last event.

  Raises:
    ValueError: a row lacks the item id or has a malformed value (naming file and line).
  """
  by_raw = {it.raw_id: i for i, it in enumerate(vocab.items)}
  rating_ids = {r: i for i, r in enumerate(vocab.ratings) if i >= schema.FIRST_ID}
  rows = _rows(path)
  if not rows:
    raise ValueError(f"{path}: no events")
  first_user = rows[0].get("userId")
  items, ratings, times, cats, lengths = [], [], [], [], []
  for line_no, row in enumerate(rows, 2):
    if first_user is not None and row.get("userId") != first_user:
      continue
    raw = row.get("movieId", row.get("item_id"))
    if raw is None:
      raise ValueError(f"{path}:{line_no}: no 'movieId' (or 'item_id') in {sorted(row)}")
    try:
      rating = float(row.get("rating", 0.0) or 0.0)
      ts = int(float(row.get("timestamp", line_no) or line_no))
    except ValueError as e:
      raise ValueError(f"{path}:{line_no}: bad rating/timestamp ({e})") from e
    item = by_raw.get(str(raw).strip(), schema.OOV_ID)
    items.append(item)
    ratings.append(rating_ids.get(rating, schema.OOV_ID))
    times.append(ts)
    c = list(vocab.items[item].category_ids) if item >= schema.FIRST_ID else []
    cats.extend(c)
    lengths.append(len(c))
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
          schema.FAVORITE_CATEGORY: np.int32(schema.PAD_ID)}


def run_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The User-LLM run directory of `workdir` (the main pipeline keeps it in a stage)."""
  return os.path.join(workdir, "user_llm") if config.job == "main_pipeline" else workdir


def load_trained(config: ml_collections.ConfigDict, workdir: str):
  """(model, tokenizer, data) of a finished User-LLM run in `workdir`."""
  sub = run_dir(config, workdir)
  if config.job == "main_pipeline":
    from user_llm_jax.jobs import main_pipeline  # pylint: disable=g-import-not-at-top
    config, workdir = main_pipeline.user_llm_stage_config(config, workdir), sub
  data = common.load_task_data(config, workdir)
  model, tokenizer, _ = common.build_model(config, data, load_weights=False)
  common.restore_module(model, os.path.join(sub, "checkpoints"))
  return model, tokenizer, data


def answer(model, tokenizer, example: dict[str, np.ndarray], prompt: list[int],
           max_new_tokens: int) -> str:
  """Greedy answer of the User-LLM to `prompt` for the user of `example`."""
  example = dict(example)
  example[ex_lib.TOKENS] = np.asarray(prompt, np.int32)
  example[ex_lib.PROMPT_LENGTH] = np.int32(len(prompt))
  cond = eval_lib.user_llm_conditioner(model, tokenizer.pad_id)(ex_lib.collate([example]))
  return eval_lib.generate(cond, tokenizer, max_new_tokens)[0]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  if not _HISTORY_FILE.value:
    raise ValueError("--mode=generate needs --history_file (MovieLens ratings CSV or JSONL)")
  model, tokenizer, data = load_trained(config, workdir)
  record = history_record(_HISTORY_FILE.value, data.vocab)
  transform = ex_lib.TaskExample(data.vocab, tokenizer, common.example_config(
      config, vocab=data.vocab))
  example = transform.crop.map(record)
  prompt = prompts.chat_prompt(tokenizer, _QUESTION.value)
  text = answer(model, tokenizer, example, prompt, _MAX_NEW_TOKENS.value)
  recent = transform.history_events(record)[-5:]
  print(f"history: {len(record[schema.ITEM_IDS]) - 1} events; most recent:\n  "
        + "\n  ".join(recent) + f"\nquestion: {_QUESTION.value}\nanswer: {text}", flush=True)
  return {"question": _QUESTION.value, "answer": text, "recent": recent}
