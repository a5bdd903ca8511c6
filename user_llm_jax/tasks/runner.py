"""The task side of the LLM jobs: task data, training batches, evaluation on a seeded sample.

Shared by the User-LLM job, the text-prompt baseline, the main pipeline and generation:

  load(config, workdir)       the prepared splits (`data.prepared`) of the config's data
  example_config(...)         the task examples' shapes and contents from `config.tasks`
  train_iterator(...)         endless shuffled (record, task) examples, batched
  eval_indices(...)           the seeded sample of test records every method is scored on
  evaluate_tasks(...)         every configured task's metrics for one conditioned LLM
  curve_metrics(...)          the learning curve's cheap figure (favorite-category accuracy
                              on `eval.curve_examples` test users), the same for every method
  shuffled_examples(...)      the same examples with each one's user swapped for the next
                              user's: the control that tells a model that reads its user
                              context from one that ignores it

Every metric dict carries `num_examples` and, for means of per-example scores, a standard
error (`<metric>_stderr`), so that every reported figure says how many users it rests on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from user_llm_jax import config as config_lib
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.train import summary as summary_lib

TaskData = prepared.Splits


def load(config: ml_collections.ConfigDict, workdir: str) -> TaskData:
  """Prepares (or reuses) the configured dataset and opens its splits."""
  return prepared.load_splits(config.data, workdir)


def example_config(config: ml_collections.ConfigDict, *, history_tokens: int = 0,
                   vocab: schema.Vocabulary | None = None,
                   max_answer_tokens: int | None = None,
                   tasks: Sequence[str] | None = None) -> ex_lib.ExampleConfig:
  """Task example shapes from `config.tasks` / `config.data` (history_tokens > 0: text prompt).

  `max_answer_tokens` and `tasks` override `tasks.max_answer_tokens` / `tasks.names` (a
  method with its own answer format or task subset, e.g. the text prompt decoding whole
  titles).
  """
  train_targets(config)  # a bad value fails here, before any data is read
  t = config.tasks
  return ex_lib.ExampleConfig(
      tasks=tuple(tasks or t.names), window=config.data.window,
      max_categories=config.data.max_categories,
      max_prompt_tokens=t.max_prompt_tokens + history_tokens,
      max_answer_tokens=max_answer_tokens or t.max_answer_tokens,
      history_tokens=history_tokens,
      review_field=t.review_field,
      dataset=vocab.dataset if vocab is not None else config.data.dataset,
      next_item_titles=bool(t.get("next_item_titles", True)))


def train_iterator(data: TaskData, transform: ex_lib.TaskExample,
                   config: ml_collections.ConfigDict, batch_size: int):
  """Endless shuffled task examples (`batch_size` is global; each process reads its share)."""
  source = ex_lib.TaskSource(data.train, transform.cfg.tasks, targets=train_targets(config))
  return iter(pipeline_lib.make_pipeline(
      source, batch_size=batch_size // jax.process_count(), seed=config.seed,
      shuffle=True, num_epochs=None, transforms=[transform],
      worker_count=config.data.worker_count))


def train_targets(config: ml_collections.ConfigDict) -> str:
  """The `tasks.train_targets` key ('last' when absent, as in runs saved before it).

  Raises:
    ConfigError: a value other than `examples.TRAIN_TARGETS`.
  """
  value = config.tasks.get("train_targets", "last")
  if value not in ex_lib.TRAIN_TARGETS:
    raise config_lib.ConfigError(f"config key 'tasks.train_targets' is {value!r}; expected "
                                 f"one of {ex_lib.TRAIN_TARGETS}")
  return value


def eval_indices(num_records: int, num: int, seed: int) -> list[int]:
  """A seeded sample of `num` test records (all when fewer), in index order."""
  if num <= 0 or num >= num_records:
    return list(range(num_records))
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(num_records, size=num, replace=False))


def build_eval_examples(data: TaskData, transform: ex_lib.TaskExample, indices: Sequence[int],
                        task: str) -> tuple[list[dict], list[str], list[int]]:
  """Task examples of the test records `indices`, their reference answers and the test
  record index of each (records without a reference review are left out of that task)."""
  out, refs, ids = [], [], []
  for i in indices:
    record = dict(data.test[i])
    record[ex_lib.TASK] = task
    answer = transform.answer_text(record, task)
    if task == prompts.REVIEW and answer is None:
      continue  # no review text to compare against
    out.append(transform.map(record))
    refs.append(answer or "")
    ids.append(int(i))
  return out, refs, ids


def shuffled_examples(examples: Sequence[Mapping[str, np.ndarray]],
                      ) -> list[dict[str, np.ndarray]]:
  """Each example's encoder inputs replaced by the next example's (cyclically).

  The prompt, the answer and the label stay; only the user the model reads changes. A
  model that uses its user context answers for the wrong user and scores about the
  agreement between two random users; a model that ignores it scores the same as before.
  """
  n = len(examples)
  keys = eval_lib.ENCODER_KEYS
  return [dict(ex, **{k: examples[(i + 1) % n][k] for k in keys if k in ex})
          for i, ex in enumerate(examples)]


def evaluate_tasks(condition: eval_lib.Conditioner, data: TaskData,
                   transform: ex_lib.TaskExample, config: ml_collections.ConfigDict, *,
                   shuffle_users: bool = False, tasks: Sequence[str] | None = None,
                   num_examples: int | None = None) -> dict[str, dict[str, Any]]:
  """Every configured task's metrics for one conditioned LLM, on the seeded test sample.

  Args:
    condition: how the LLM reads the user (`evaluate.user_llm_conditioner` /
      `evaluate.text_conditioner`).
    data: the task data.
    transform: record -> task example.
    config: the run's config (`eval.*`, `seed`, `tasks.max_answer_tokens`).
    shuffle_users: evaluate the shuffled-context control (`shuffled_examples`).
    tasks: the tasks to evaluate (default: every configured task).
    num_examples: how many test records to sample with the run's seed (default
      `eval.num_examples`).
  """
  num = config.eval.num_examples if num_examples is None else num_examples
  indices = eval_indices(len(data.test), num, config.seed)
  results: dict[str, dict[str, Any]] = {}
  for task in tasks or transform.cfg.tasks:
    # `ids` (test record indices) key each example's result: methods evaluated on the same
    # seeded sample are compared example by example (`eval.paired`).
    examples, refs, ids = build_eval_examples(data, transform, indices, task)
    if shuffle_users:
      examples = shuffled_examples(examples)
    tag = " (shuffled users)" if shuffle_users else ""
    start = time.perf_counter()
    if task == prompts.NEXT_ITEM:
      catalogue = eval_lib.Catalogue(data.vocab, transform.tokenizer,
                                     max_tokens=transform.cfg.max_answer_tokens)
      results[task] = eval_lib.evaluate_next_item(
          condition, examples, catalogue, ks=tuple(config.eval.ks),
          exact_threshold=config.eval.exact_threshold, batch_size=config.eval.batch_size,
          desc="eval next item" + tag, ids=ids)
    elif task == prompts.FAVORITE_CATEGORY:
      results[task] = eval_lib.evaluate_category(
          condition, examples, data.vocab, transform.tokenizer,
          batch_size=config.eval.batch_size, desc="eval favorite category" + tag, ids=ids)
    else:
      results[task] = eval_lib.evaluate_review(
          condition, examples, refs, transform.tokenizer,
          max_new_tokens=transform.cfg.max_answer_tokens + 1, batch_size=config.eval.batch_size,
          desc="eval review" + tag, ids=ids,
          likelihood=bool(config.eval.get("review_likelihood", False)))
    # The likelihood check is a diagnostic, not part of answering: not in s / answer.
    seconds = time.perf_counter() - start - results[task].get("likelihood_sec", 0.0)
    results[task]["eval_sec"] = seconds
    results[task]["sec_per_answer"] = seconds / max(len(examples), 1)
    results[task]["mean_prompt_tokens"] = float(np.mean(
        [int(ex[ex_lib.PROMPT_LENGTH]) for ex in examples])) if examples else 0.0
  return results


def curve_metrics(condition: eval_lib.Conditioner, data: TaskData,
                  transform: ex_lib.TaskExample,
                  config: ml_collections.ConfigDict) -> dict[str, float]:
  """The learning curve's figures for one conditioned LLM (every `train.eval_every` steps).

  Favorite-category accuracy by exact scoring of the label set on the first
  `eval.curve_examples` users of the seeded test sample: cheap, and the same procedure for
  User-LLM and the text prompt, so their curves are comparable point by point. Empty when
  the task is not configured.
  """
  if prompts.FAVORITE_CATEGORY not in transform.cfg.tasks:
    return {}
  got = evaluate_tasks(condition, data, transform, config, tasks=(prompts.FAVORITE_CATEGORY,),
                       num_examples=config.eval.curve_examples)
  return {"fav_acc": got[prompts.FAVORITE_CATEGORY]["accuracy"]}


def wants_curve(config: ml_collections.ConfigDict) -> bool:
  """Whether a run computes a learning curve (`train.eval_every` and `eval.curve_examples`)."""
  return config.train.eval_every > 0 and config.eval.curve_examples > 0


# The headline metric of each task, in table order.
TASK_COLUMNS: tuple[tuple[str, str, str], ...] = (
    (prompts.NEXT_ITEM, "recall@{k}", "R@{k}"),
    (prompts.FAVORITE_CATEGORY, "accuracy", "fav_acc"),
    (prompts.REVIEW, "rougeLsum", "rougeLsum"),
    # Present with `eval.review_likelihood` (rows that do not decode show '-').
    (prompts.REVIEW, "reference_logprob", "ref_logp"),
    (prompts.REVIEW, "search_errors", "search_err"),
)


def results_table(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], ks: Sequence[int],
                  extra: Mapping[str, Callable[[str], Any]] | None = None) -> str:
  """Rows = methods; columns = each task's metric as 'value +- stderr', and n per task.

  Args:
    metrics: {method: {task: metric dict}}.
    ks: the k of Recall@k shown.
    extra: more columns, {header: method name -> cell}.
  """
  cols, headed = [], set()
  for task, key, head in TASK_COLUMNS:
    keys = [(key.format(k=k), head.format(k=k)) for k in ks] if "{k}" in key else [(key, head)]
    if not any(task in m for m in metrics.values()):
      continue
    if task in headed:  # a further metric of the task: only if some row has it, one n
      cols += [(task, k, h) for k, h in keys
               if any(k in m.get(task, {}) for m in metrics.values())]
      continue
    headed.add(task)
    cols += [(task, k, h) for k, h in keys] + [(task, "num_examples", f"n({head.split('@')[0]})")]
  rows = []
  for name, by_task in metrics.items():
    row = [name]
    for task, key, _ in cols:
      m = by_task.get(task, {})
      value = m.get(key)
      if value is None:
        row.append("-")
      elif key == "num_examples":
        row.append(str(int(value)))
      elif m.get(f"{key}_stderr") is not None:
        row.append(f"{float(value):.3f} +- {float(m[f'{key}_stderr']):.3f}")
      else:
        row.append(f"{float(value):.3f}")
    for fn in (extra or {}).values():
      row.append(fn(name))
    rows.append(row)
  header = ["method"] + [h for _, _, h in cols] + list(extra or {})
  return summary_lib.format_table(rows, header)
