r"""`--mode=infer`: a trained model answers for every user of a file or of a prepared split.

  # every user of a history file (CSV with a userId column, or JSON lines with `userId`)
  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=infer --history_file=users.csv --output=answers.jsonl
  # every record of the run's own test split (its data config, prepared if needed)
  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=infer --split=test --top_k=10
  # the same users answered by the text-prompt baseline (the main job's stage)
  python -m experiments.main --config=experiments/configs/main.py \
      --workdir=/tmp/main/text_baseline --mode=infer --split=test

The workdir's `run.json` says which model answers: a User-LLM run (or the main job's
workdir, whose `user_llm/` stage is one) or a text-prompt baseline run, whose prompts
hold each user's history as text (`text_prompt.reader`: its tasks, answer length and
next-item ranking as in its evaluation; top items only when it is scored on the next item).

One JSON line per user: `user_id` (and `record`, the split index), the top `--top_k`
catalogue items with scores (item head, else titles: `inference.Answerer`), the greedy
answer of every configured task (review only for split records, whose target names the
item), and for split records the true target and answers (`target`, `references`).
Users go `eval.batch_size` at a time (the run's config) through the evaluation's jitted
functions, with a progress bar. Killed and rerun with the same flags, the job keeps the
answers already written and continues with the rest (`answer_log.AnswerLog`); a summary
with the throughput (users/s, with and without the first batch, which compiles), the
seconds of each part of an answer and the mean prompt length is printed and written
beside the answers (`answers.jsonl` -> `answers.summary.json`).
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
from user_llm_jax import text_prompt
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


def _answering_run(workdir: str) -> runs.Run:
  """The User-LLM or text-prompt baseline run of `workdir` (its `run.json` says which).

  Raises:
    NotARunError: neither (the message says what to run).
  """
  try:
    job = runs.load_run(workdir, checkpoint=False).job
  except runs.NotARunError:
    job = None  # no run.json: the main job's workdir (its stages), or no run at all
  if job == text_prompt.JOB:
    return text_prompt.trained_run(workdir)
  stage = inference.run_dir(workdir) != workdir
  if job in inference.USER_LLM_JOBS or (job is None and stage):
    return inference.trained_run(workdir)
  found = f"it holds a {job!r} run" if job else f"no {runs.RUN_JSON}"
  raise runs.NotARunError(
      f"{os.path.abspath(os.path.expanduser(workdir))!r} holds no trained User-LLM or "
      f"text-prompt baseline run ({found}); make a User-LLM with: {inference.MAKE_HINT}; a "
      f"text-prompt baseline with: {text_prompt.MAKE_HINT}")


def _answerer(run: runs.Run, vocab: schema.Vocabulary, top_k: int,
              batch_size: int) -> inference.Answerer:
  tokenizer = run.tokenizer()
  if run.job == text_prompt.JOB:
    return text_prompt.answerer(run, text_prompt.load_model(run), tokenizer, vocab,
                                top_k=top_k, pad_to=batch_size)
  return inference.Answerer(inference.load_model(run), tokenizer, vocab, run.config,
                            top_k=top_k, pad_to=batch_size)


def _lines(answerer: inference.Answerer, users: _Users, positions: Sequence[int],
           tasks: Sequence[str], parts: dict[str, float]) -> list[dict[str, Any]]:
  """The answer lines of the users at `positions` (one batch); adds each part's seconds
  to `parts` (every part returns host values, so its time is spent when it returns)."""
  recs = [users.fetch(users.keys[i]) for i in positions]
  top: list[Any] = [None] * len(recs)
  if answerer.reader.ranks_items:
    start = time.perf_counter()
    top = answerer.top_items(recs)
    parts["top_items"] = parts.get("top_items", 0.0) + time.perf_counter() - start
  texts: list[dict[str, str]] = [{} for _ in recs]
  for task in tasks:
    start = time.perf_counter()
    for text, answer in zip(texts, answerer.task_answers(recs, [task])):
      text.update(answer)
    parts[f"answer:{task}"] = parts.get(f"answer:{task}", 0.0) + time.perf_counter() - start
  lines = []
  for i, rec, items, text in zip(positions, recs, top, texts):
    line = {"user_id": _user_id(rec)}
    if users.key_field != "user_id":
      line[users.key_field] = users.keys[i]
    if answerer.reader.ranks_items:
      line["top_items"] = items
    line["answers"] = text
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


def infer(workdir: str, *, history_file: str | None = None, split: str | None = None,
          top_k: int = 10, output: str | None = None, max_users: int = 0) -> dict[str, Any]:
  """Answers every user of `history_file` or of the run's `split`; returns the summary.

  Args:
    workdir: a User-LLM run (or the main job's workdir) or a text-prompt baseline run.
    history_file: a file of many users (`histories.read_histories`).
    split: instead, a split of the run's own prepared data ('train', 'validation', 'test').
    top_k: catalogue items ranked per user.
    output: the JSON-lines answers file (default `<run>/answers_<input>.jsonl`); a file
      written by an interrupted run with the same settings is continued.
    max_users: answer only the first N users of the input (0: all).

  Raises:
    BadInputError: bad input, or an answers file of other settings or users.
    NotARunError: the workdir holds no model that answers (the message says what to run).
  """
  path = history_file
  if bool(path) == bool(split):
    raise records.BadInputError(
        "--mode=infer needs exactly one of --history_file (a file of many users) and "
        f"--split ({', '.join(SPLITS)})")
  if top_k < 1:
    raise records.BadInputError(f"--top_k must be >= 1, got {top_k}")
  trained = _answering_run(workdir)
  vocab = trained.vocabulary()
  users = _file_users(path, vocab) if path else _split_users(split, trained, vocab)
  name = split or os.path.splitext(os.path.basename(path))[0]
  output = output or os.path.join(trained.workdir, f"answers_{name}.jsonl")
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
  limit = min(max_users or len(users), len(users))
  todo = [i for i, k in enumerate(users.keys[:limit]) if k not in kept]
  batch_size = int(trained.config.eval.batch_size)
  answerer, seconds, first_seconds, parts = None, 0.0, 0.0, {}
  reader = inference.TEXT_PROMPT if trained.job == text_prompt.JOB else inference.USER_LLM
  if todo:
    answerer = _answerer(trained, vocab, top_k, batch_size)
    tasks = answerer.answered_tasks(users.with_targets)
    t0 = time.perf_counter()
    with tqdm.tqdm(total=limit, initial=limit - len(todo), unit="user",
                   desc=f"infer {name} ({reader})") as bar:
      for lo in range(0, len(todo), batch_size):
        log.append(_lines(answerer, users, todo[lo:lo + batch_size], tasks, parts))
        bar.update(len(todo[lo:lo + batch_size]))
        if lo == 0:
          first_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
  summary = {"output": os.path.abspath(output), "reader": reader, "run": trained.workdir,
             "users": len(users), "answered_now": len(todo), "kept_from_earlier": len(kept),
             "batch_size": batch_size, "seconds": seconds, "first_batch_seconds": first_seconds,
             **_speed(len(todo), seconds, min(batch_size, len(todo)), first_seconds),
             "seconds_by_part": parts,
             "tasks": list(tasks) if answerer else None,
             "max_new_tokens": answerer.max_answer_tokens + 1 if answerer else None,
             "mean_prompt_tokens": answerer.mean_prompt_tokens() if answerer else None,
             "ranking": answerer.procedure if answerer and answerer.reader.ranks_items
             else None, **users.source}
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  del config  # everything comes from the trained run in `workdir`
  return infer(workdir, history_file=inference_flags.HISTORY_FILE.value, split=_SPLIT.value,
               top_k=inference_flags.TOP_K.value, output=inference_flags.OUTPUT.value,
               max_users=_MAX_USERS.value)
