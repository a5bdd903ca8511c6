r"""`--mode=infer`: a trained User-LLM answers for every user of a file or of a prepared split.

  # every user of a history file (CSV with a userId column, or JSON lines with `userId`)
  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=infer --history_file=users.csv --output=answers.jsonl
  # every record of the run's own test split (its data config, prepared if needed)
  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=infer --split=test --top_k=10

One JSON line per user: `user_id` (and `record`, the split index), the top `--top_k`
catalogue items with scores (item head, else titles: `inference.Answerer`), the greedy
answer of every configured task (review only for split records, whose target names the
item), and for split records the true target and answers (`target`, `references`).
Users go `eval.batch_size` at a time (the run's config) through the evaluation's jitted
functions, with a progress bar. Killed and rerun with the same flags, the job keeps the
answers already written and continues with the rest (`answer_log.AnswerLog`); a summary
with the throughput (users/s) is printed and written beside the answers
(`answers.jsonl` -> `answers.summary.json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import flags

from data_pipelines import records
from user_llm_jax import answer_log
from user_llm_jax import histories
from user_llm_jax import inference
from user_llm_jax import inference_flags
from user_llm_jax import runs
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.train import checkpointing

SPLITS = ("train", "validation", "test")

_MAX_USERS = flags.DEFINE_integer(
    "max_users", 0, "--mode=infer: answer only the first N users of the input (0: all); a "
    "rerun with a larger N continues the same output.")
_SPLIT = flags.DEFINE_string(
    "split", None, "--mode=infer: answer the records of this split of the run's own "
    f"prepared data ({', '.join(SPLITS)}) instead of a --history_file.")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Users:
  """The users to answer.

  Attributes:
    keys: each user's key in the answers file (user id, or split record index), in order.
    fetch: key -> the user's schema record.
    key_field: the answer line's field holding the key.
    with_targets: the records end with a real target event (a split), not a placeholder.
    source: what the input is (recorded in the summary).
  """

  keys: list[Any]
  fetch: Callable[[Any], dict[str, Any]]
  key_field: str
  with_targets: bool
  source: dict[str, Any]

  def __len__(self) -> int:
    return len(self.keys)


def _file_users(path: str, vocab: schema.Vocabulary) -> _Users:
  found = histories.read_histories(path, vocab, need_user_ids=True)
  print(found.report(), flush=True)
  by_user = {h.user_id: h.record for h in found.histories}
  return _Users(list(by_user), by_user.__getitem__, key_field="user_id", with_targets=False,
                source={"history_file": os.path.abspath(path), "sha256": _sha256(path),
                        **{k: v for k, v in found.totals().items() if k != "users"}})


def _split_users(split: str, run: runs.Run, vocab: schema.Vocabulary) -> _Users:
  if split not in SPLITS:
    raise records.BadInputError(f"--split={split!r}: expected one of {SPLITS}")
  data = prepared.load_splits(run.config.data, run.workdir)
  if data.vocab.items != vocab.items:
    raise records.BadInputError(
        f"the prepared data at {data.path} has another catalogue ({data.vocab.num_items} "
        f"items) than the trained run ({vocab.num_items}): prepare it with the run's "
        "data config")
  source = getattr(data, split)
  if source is None:
    raise records.BadInputError(f"the run's data ({run.config.data.protocol} protocol) has "
                                f"no {split!r} split")

  def fetch(index: int) -> dict[str, Any]:
    return dict(source[index])

  return _Users(list(range(len(source))), fetch, key_field="record", with_targets=True,
                source={"split": split, "data": data.path, "records": len(source)})


def _user_id(record: dict[str, Any]) -> str:
  user = record.get(schema.USER_ID, b"")
  return user.decode("utf-8", errors="replace") if isinstance(user, bytes) else str(user)


def _target(record: dict[str, Any], vocab: schema.Vocabulary) -> dict[str, Any]:
  item = int(np.asarray(record[schema.ITEM_IDS]).reshape(-1)[-1])
  info = vocab.items[item] if 0 <= item < vocab.num_items else None
  return {"item_id": info.raw_id if item >= schema.FIRST_ID else None,
          "title": info.title if item >= schema.FIRST_ID else None}


def _lines(answerer: inference.Answerer, users: _Users, positions: Sequence[int],
           tasks: Sequence[str]) -> list[dict[str, Any]]:
  """The answer lines of the users at `positions` (one batch)."""
  recs = [users.fetch(users.keys[i]) for i in positions]
  top = answerer.top_items(recs)
  texts = answerer.task_answers(recs, tasks)
  lines = []
  for i, rec, items, text in zip(positions, recs, top, texts):
    line = {"user_id": _user_id(rec)}
    if users.key_field != "user_id":
      line[users.key_field] = users.keys[i]
    line.update(top_items=items, answers=text)
    if users.with_targets:
      line.update(target=_target(rec, answerer.vocab),
                  references=answerer.references(rec, tasks))
    lines.append(line)
  return lines


def _speed(answered: int, seconds: float, first_batch: int, first_seconds: float,
           ) -> dict[str, float | None]:
  """users/s over the whole loop, and without the first batch (which compiles)."""
  rest, rest_seconds = answered - first_batch, seconds - first_seconds
  return {"users_per_sec": answered / seconds if answered and seconds > 0 else None,
          "users_per_sec_after_first_batch": rest / rest_seconds
          if rest > 0 and rest_seconds > 0 else None}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  del config  # everything comes from the trained run in `workdir`
  path, split = inference_flags.HISTORY_FILE.value, _SPLIT.value
  if bool(path) == bool(split):
    raise records.BadInputError(
        "--mode=infer needs exactly one of --history_file (a file of many users) and "
        f"--split ({', '.join(SPLITS)})")
  top_k = inference_flags.TOP_K.value
  if top_k < 1:
    raise records.BadInputError(f"--top_k must be >= 1, got {top_k}")
  trained = inference.trained_run(workdir)
  vocab = trained.vocabulary()
  users = _file_users(path, vocab) if path else _split_users(split, trained, vocab)
  name = split or os.path.splitext(os.path.basename(path))[0]
  output = inference_flags.OUTPUT.value or os.path.join(trained.workdir,
                                                        f"answers_{name}.jsonl")
  settings = {"run": trained.workdir,
              "checkpoint_step": checkpointing.latest_step(trained.checkpoints),
              "top_k": top_k, **{k: v for k, v in users.source.items()
                                 if k in ("history_file", "sha256", "split", "data")}}
  log = answer_log.AnswerLog(output, settings, key=users.key_field)
  kept = log.resume()
  if log.dropped_partial_line:
    print(f"{output}: dropped a partially written last line (an interrupted run)", flush=True)
  wanted = set(users.keys)
  strangers = [k for k in kept if k not in wanted]
  if strangers:
    raise records.BadInputError(f"{output} answers {users.key_field} {strangers[0]!r}, which "
                                "is not in this input; choose another --output")
  limit = min(_MAX_USERS.value or len(users), len(users))
  todo = [i for i, k in enumerate(users.keys[:limit]) if k not in kept]
  batch_size = int(trained.config.eval.batch_size)
  answerer, seconds, first_seconds = None, 0.0, 0.0
  if todo:
    answerer = inference.Answerer(inference.load_model(trained), trained.tokenizer(), vocab,
                                  trained.config, top_k=top_k, pad_to=batch_size)
    tasks = answerer.answered_tasks(users.with_targets)
    t0 = time.perf_counter()
    with tqdm.tqdm(total=limit, initial=limit - len(todo), unit="user",
                   desc=f"infer {name}") as bar:
      for lo in range(0, len(todo), batch_size):
        log.append(_lines(answerer, users, todo[lo:lo + batch_size], tasks))
        bar.update(len(todo[lo:lo + batch_size]))
        if lo == 0:
          first_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
  summary = {"output": os.path.abspath(output), "users": len(users),
             "answered_now": len(todo), "kept_from_earlier": len(kept),
             "batch_size": batch_size, "seconds": seconds,
             **_speed(len(todo), seconds, min(batch_size, len(todo)), first_seconds),
             "ranking": answerer.procedure if answerer else None, **users.source}
  log.finish(summary)
  speed = ""
  if summary["users_per_sec"]:
    speed = f" ({summary['users_per_sec']:.2f} users/s at batch {batch_size}"
    if summary["users_per_sec_after_first_batch"]:
      speed += (f", {summary['users_per_sec_after_first_batch']:.2f} users/s after the first "
                "batch")
    speed += ")"
  print(f"answered {len(todo)} user(s) in {seconds:.1f} s{speed}; {len(kept)} kept from an "
        f"earlier run; {len(kept) + len(todo)} of {len(users)} users answered in {output}",
        flush=True)
  return summary
