"""Jobs that rank the whole catalogue (encoder pretraining, dual encoder): batches and report.

`RankingData` adds the record -> example transform and batching to a prepared dataset's
splits; `test_summary` evaluates a trained ranking model on the test split next to the
popularity baseline fitted on the same training split, and `write_report` writes
`summary.json`, `summary.txt` and the loss / validation plot.

`context_check` tells apart two causes of test figures below validation ones on the
leave-one-out split: each split's targets ranked from its full context and from the context
without the event just before the target (two steps ahead). The validation context is a
training record the model was fitted on; the test context ends with the validation event,
one it never read as input there. If the two splits tie two steps ahead but not one step
ahead, the test targets are not harder: the test context's newest event is what differs.
It also reports, per split, the share of targets whose last transition (the event before
the target -> the target) occurs in some training record, and Recall@10 on the targets with
and without one (a split whose transitions were seen more often ranks better for that
reason alone), the first-order transition baseline on both splits (what repeating seen
transitions alone gives) and the model with that baseline's counts added to its logits
(the weight chosen on validation). Under the protocol that ranks every item, it also ranks
the test targets with the items of the model's own input window removed
(`window_excluded`): what the model loses by putting items the user already had in its top
ranks.

Protocol keys read here (every report states them, `protocol(config)`):
  data.train_windows   'last' (default: each training record's most recent events) or
                       'random' (random windows over the whole history, `data.windows`)
  data.train_through_validation
                       False (default): train on the training split; True (a refit):
                       train on the validation records, i.e. every event but the test
                       one, for a step count chosen by an earlier run's validation (no
                       validation split is left to select on). Tells whether the test
                       context's newest event, never trained on, is what holds test below
                       validation (`context_check`).
  eval.exclude_seen    False (default): rank every item; True: the user's earlier items
                       are excluded from the ranking (`retrieval.WithSeenItems`)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.data import windows as windows_lib
from user_llm_jax.encoder import model as encoder_model
from user_llm_jax.eval import paired
from user_llm_jax.eval import popularity
from user_llm_jax.eval import retrieval
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class RankingData:
  """A prepared dataset's splits with the encoder's crop, batched for training and ranking."""

  splits: prepared.Splits
  transforms: tuple[Any, ...]
  eval_transforms: tuple[Any, ...] = ()

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: str) -> "RankingData":
    train_windows(config)  # Fails on a bad value before the data is prepared.
    refit = train_through_validation(config)  # Checked before the data is prepared too.
    splits = prepared.load_splits(config.data, workdir)
    if refit:
      # The validation records hold every event but the test one; the training records
      # are their prefixes, so nothing else is lost.
      splits = dataclasses.replace(splits, train=splits.validation, validation=None)
    crop = prepared.crop(config.data)
    eval_transforms = (crop,)
    if exclude_seen(config):
      eval_transforms = (retrieval.WithSeenItems(crop, splits.vocab.num_items),)
    return cls(splits, (crop,), eval_transforms)

  @property
  def path(self) -> str:
    return self.splits.path

  @property
  def train(self) -> Any:
    return self.splits.train

  @property
  def test(self) -> Any:
    return self.splits.test

  @property
  def vocab(self) -> Any:
    return self.splits.vocab

  @property
  def stats(self) -> dict:
    return self.splits.stats

  def train_iterator(self, config: ml_collections.ConfigDict, batch_size: int):
    """Endless shuffled training batches (`batch_size` is global; each process reads its share)."""
    source = self.splits.train
    if train_windows(config) == "random":
      source = windows_lib.RandomWindows(source, config.data.window, seed=config.seed)
    return iter(pipeline_lib.make_pipeline(
        source, batch_size=batch_size // jax.process_count(), seed=config.seed,
        shuffle=True, num_epochs=None, transforms=list(self.transforms),
        worker_count=config.data.worker_count))

  def eval_batches(self, config: ml_collections.ConfigDict, src, *, before: Sequence[Any] = ()):
    """One pass over `src` in `config.eval.batch_size` batches (with `seen_items` when the
    protocol excludes seen items); `before`: record transforms applied first."""
    return pipeline_lib.make_eval_pipeline(src, batch_size=config.eval.batch_size,
                                           transforms=[*before, *(self.eval_transforms
                                                                  or self.transforms)])

  def validation_fn(self, config: ml_collections.ConfigDict, ks: Sequence[int],
                    ) -> Callable[[Any], dict[str, float]] | None:
    """`model -> metrics` at each evaluation, or None without a validation split.

    `val/<metric>`: the validation split's ranking (what best-step selection reads).
    `fit/<metric>`: the same ranking of the last event of training records, events the
    model trains on (as many records as the validation split has, evenly spaced over the
    training split). The gap between the two tells the causes of a plateau apart: `fit`
    far above `val` is memorization (regularize); `fit` level with `val` is under-fitting
    (train longer or wider).
    """
    validation = self.splits.validation
    if validation is None:
      return None
    fit = EvenSample(self.splits.train, len(validation))

    def ranking(m, prefix, source):
      return {f"{prefix}/{k}": v for k, v in retrieval.evaluate_next_item(
          m, self.eval_batches(config, source), ks=ks).items()
              if k != "num_examples" and not k.endswith("_stderr")}

    return lambda m: {**ranking(m, "val", validation), **ranking(m, "fit", fit)}


class DropBeforeTarget(grain.transforms.Map):
  """Record -> the record without the event just before its last (target) event."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    n = np.asarray(element[schema.ITEM_IDS]).reshape(-1).size
    if n < 3:
      raise ValueError(f"DropBeforeTarget: a record of {n} events; the context check needs "
                       ">= 3 (a target and two context events): run it on k-core data "
                       "(data.kcore_users >= 4)")
    return windows_lib.drop_event(element, n - 2)


def context_check_applies(config: ml_collections.ConfigDict) -> bool:
  """Whether `context_check` runs: leave-one-out splits whose validation records hold >= 3
  events (k-core users with >= 4)."""
  return (config.data.protocol == "leave_last_out"
          and int(config.data.get("kcore_users", 0) or 0) >= 4)


def context_check(model: Any, config: ml_collections.ConfigDict, data: RankingData, *,
                  ks: Sequence[int], test_metrics: Mapping[str, Any],
                  validation_metrics: Mapping[str, Any] | None = None,
                  ) -> dict[str, dict[str, Any]]:
  """Validation and test targets ranked from the full context and without the event before
  the target (module docstring): `{condition: metrics}`, plus `transition_seen`
  (`transition_breakdown` of each split), `first_order` (the first-order transition
  baseline's metrics on each split, `popularity.FirstOrder`) and `first_order_mix` (the
  model with that baseline's counts added, `first_order_mix`). `test_metrics`: the model's test ranking already
  computed (the full-context test condition), with its per-example values;
  `validation_metrics` likewise for the validation split, when the caller has ranked it
  already (None: ranked here)."""
  validation = data.splits.validation
  out = {"test": {k: v for k, v in test_metrics.items() if k != paired.PER_EXAMPLE}}
  if validation_metrics is not None:
    out["validation"] = dict(validation_metrics)
  for name, source, drop in (("validation", validation, False),
                             ("validation_two_ahead", validation, True),
                             ("test_two_ahead", data.test, True)):
    if name in out:
      continue
    batches = data.eval_batches(config, source, before=[DropBeforeTarget()] if drop else [])
    ids = range(len(source)) if name == "validation" else None
    out[name] = retrieval.evaluate_next_item(model, batches, ks=ks, ids=ids)
  first_order = popularity.FirstOrder(data.train, data.vocab.num_items)
  out["transition_seen"] = {
      split: transition_breakdown(last_transition_seen(source, first_order), metrics)
      for split, source, metrics in (("validation", validation, out["validation"]),
                                     ("test", data.test, test_metrics))}
  out["validation"].pop(paired.PER_EXAMPLE)
  out["first_order"] = {split: popularity.evaluate_first_order(
      first_order, data.eval_batches(config, source), ks=ks)
                        for split, source in (("validation", validation), ("test", data.test))}
  out["first_order_mix"] = first_order_mix(model, config, data, ks=ks,
                                           first_order=first_order, test_metrics=test_metrics)
  if not exclude_seen(config):
    out["window_excluded"] = window_excluded(model, config, data, ks=ks,
                                             test_metrics=test_metrics)
  return out


def _window_excluded_scores(graphdef: nnx.GraphDef, state: Any,
                            batch: Mapping[str, jax.Array]) -> jax.Array:
  logits = nnx.merge(graphdef, state).next_item_logits(batch)
  return retrieval.exclude_seen(logits, encoder_model.read_items(batch, logits.shape[-1]))


def window_excluded(model: Any, config: ml_collections.ConfigDict, data: RankingData, *,
                    ks: Sequence[int], test_metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The test split ranked with the items of the model's own input window set to -inf.

  A control, not a protocol: it tells how much the model loses by ranking items the user
  already has in the events it reads (on data where users never return to an item, every
  such item in the top 10 is a wasted slot). Unlike `eval.exclude_seen` it removes only
  what the model reads, not the user's whole history.

  Returns:
    {'test': metrics, 'test_vs_model': paired differences of Recall@10 and NDCG@10}.
  """
  graphdef, state = nnx.split(model)
  test = retrieval.evaluate_scores(
      _window_excluded_scores, graphdef, state, data.eval_batches(config, data.test), ks=ks,
      desc="eval window items excluded", ids=range(len(data.test)))
  versus = paired_differences(test, test_metrics)
  test.pop(paired.PER_EXAMPLE)
  return {"test": test, "test_vs_model": versus}


def paired_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict]:
  """`a - b` of test Recall@10 and NDCG@10 (`paired.difference`, paired over the examples
  both carry values for), as JSON-able dicts."""
  return {key: dataclasses.asdict(paired.difference(a, b, key))
          for key in ("recall@10", "ndcg@10")}


# Weights of the transition prior tried on validation (0: the model alone).
MIX_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _mixed_scores(graphdef: nnx.GraphDef, params: tuple[Any, jax.Array],
                  batch: Mapping[str, jax.Array]) -> jax.Array:
  # The weight is traced, not static: every weight reuses one compiled scorer.
  state, weight = params
  logits = nnx.merge(graphdef, state).next_item_logits(batch)
  return logits + weight * jnp.log1p(batch[popularity.FIRST_ORDER_SCORES])


def first_order_mix(model: Any, config: ml_collections.ConfigDict, data: RankingData, *,
                    ks: Sequence[int], first_order: popularity.FirstOrder,
                    test_metrics: Mapping[str, Any],
                    weights: Sequence[float] = MIX_WEIGHTS) -> dict[str, Any]:
  """The model's logits plus `w * log(1 + transition count from the context's last item)`
  (a first-order Markov prior on top of the sequence model, as FPMC adds one), `w` chosen
  by validation NDCG@10 over `weights`, then the test split ranked once with it.

  Args:
    test_metrics: the model's own test ranking with per-example values (for the paired
      differences).

  Returns:
    {'weights', 'validation_ndcg@10' (one per weight), 'weight' (selected),
    'validation' and 'test' (metrics at the selected weight), 'test_vs_model' (paired
    differences of the test Recall@10 and NDCG@10 against the model alone)}.
  """
  graphdef, state = nnx.split(model)

  def evaluate(source, weight, ids=None):
    batches = popularity.with_transition_scores(first_order, data.eval_batches(config, source))
    return retrieval.evaluate_scores(_mixed_scores, graphdef, (state, jnp.float32(weight)),
                                     batches, ks=ks, desc=f"eval mix w={weight:g}", ids=ids)

  validation = [evaluate(data.splits.validation, w) for w in weights]
  best = max(range(len(weights)), key=lambda i: (validation[i]["ndcg@10"], -i))
  test = evaluate(data.test, weights[best], ids=range(len(data.test)))
  versus = paired_differences(test, test_metrics)
  test.pop(paired.PER_EXAMPLE)
  return {"weights": list(weights),
          "validation_ndcg@10": [v["ndcg@10"] for v in validation],
          "weight": weights[best], "validation": validation[best], "test": test,
          "test_vs_model": versus}


def last_transition_seen(records: Any, first_order: popularity.FirstOrder) -> np.ndarray:
  """Per record: whether its last pair (the event before the target, the target) is one of
  the training transitions `first_order` counts."""
  last = [popularity.transition_codes(records[i][schema.ITEM_IDS], first_order.num_items)[-1:]
          for i in range(len(records))]
  return np.isin(np.concatenate(last), first_order.pairs) if last else np.zeros(0, bool)


def transition_breakdown(seen: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, float]:
  """The share of targets with a seen last transition, and Recall@10 (+- SE) of the targets
  with and without one; `metrics` must carry per-example values keyed by record index."""
  values = paired.example_values(metrics, "recall@10")
  if values is None or len(values) != seen.size:
    raise ValueError(f"transition_breakdown: per-example recall@10 of {seen.size} records "
                     f"needed, got {None if values is None else len(values)}")
  hits = np.array([values[i] for i in range(seen.size)])
  out = {"num_examples": int(seen.size), "fraction": float(seen.mean()) if seen.size else 0.0}
  for name, mask in (("seen", seen), ("unseen", ~seen)):
    group = hits[mask]
    out[f"n_{name}"] = int(group.size)
    out[f"recall@10_{name}"] = float(group.mean()) if group.size else float("nan")
    out[f"recall@10_{name}_stderr"] = (float(group.std(ddof=1) / np.sqrt(group.size))
                                       if group.size > 1 else float("nan"))
  return out


def differences_text(differences: Mapping[str, Mapping[str, float]]) -> str:
  """'recall@10 +0.0180 (2 SE 0.0108); ndcg@10 ...' of `paired_differences`."""
  return "; ".join(f"{key} {d['diff']:+.4f} (2 SE {2 * d['se']:.4f})"
                   for key, d in differences.items())


def context_check_text(check: Mapping[str, Mapping[str, float]]) -> str:
  """One line per split: R@10 and NDCG@10 (+- SE) one and two steps ahead."""
  def fig(m, key):
    return f"{m[key]:.4f} +- {m.get(key + '_stderr', float('nan')):.4f}"

  def both_splits(by_split):   # 'validation R@10, NDCG@10; test R@10, NDCG@10'
    return "; ".join(f"{split} {fig(by_split[split], 'recall@10')}, "
                     f"{fig(by_split[split], 'ndcg@10')}" for split in ("validation", "test"))
  lines = ["context check (the selected model; R@10, NDCG@10; full context -> without the "
           "event before the target):"]
  for split, noun in (("validation", "validation targets"), ("test", "test targets")):
    one, two = check[split], check[split + "_two_ahead"]
    lines.append(f"  {noun} (n = {int(one['num_examples'])}): "
                 f"{fig(one, 'recall@10')}, {fig(one, 'ndcg@10')} -> "
                 f"{fig(two, 'recall@10')}, {fig(two, 'ndcg@10')}")
  seen = check.get("transition_seen")
  if seen:
    lines.append("  last transition (event before the target -> target) in some training "
                 "record; R@10 of the targets with / without one:")
    for split in ("validation", "test"):
      t = seen[split]
      lines.append(f"    {split}: {t['fraction']:.1%} of {t['num_examples']}; "
                   f"{fig(t, 'recall@10_seen')} (n = {t['n_seen']}) / "
                   f"{fig(t, 'recall@10_unseen')} (n = {t['n_unseen']})")
  first = check.get("first_order")
  if first:
    lines.append("  first-order transitions (popularity breaking ties), R@10 and NDCG@10: "
                 + both_splits(first))
  mix = check.get("first_order_mix")
  if mix:
    lines.append(f"  the model plus {mix['weight']:g} x log(1 + transition count) (weight "
                 f"chosen by validation NDCG@10 over {mix['weights']}), R@10 and NDCG@10: "
                 + both_splits(mix))
    lines.append("    test, against the model alone (paired): "
                 + differences_text(mix["test_vs_model"]))
  window = check.get("window_excluded")
  if window:
    t = window["test"]
    lines.append(f"  test with the items of the model's input window excluded (a control): "
                 f"{fig(t, 'recall@10')}, {fig(t, 'ndcg@10')}; against the model (paired): "
                 + differences_text(window["test_vs_model"]))
  return "\n".join(lines)


class EvenSample:
  """`size` records of a random-access source, evenly spaced (all of it when smaller)."""

  def __init__(self, source: Any, size: int):
    self.source = source
    n = len(source)
    self.indices = list(range(n)) if size >= n else [i * n // size for i in range(size)]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[self.indices[index]]


TRAIN_WINDOWS = ("last", "random")


def train_windows(config: ml_collections.ConfigDict) -> str:
  """The `data.train_windows` key ('last' when absent), validated."""
  value = config.data.get("train_windows", "last")
  if value not in TRAIN_WINDOWS:
    raise config_lib.ConfigError(
        f"config key 'data.train_windows' is {value!r}; expected one of {TRAIN_WINDOWS}")
  return value


def train_through_validation(config: ml_collections.ConfigDict) -> bool:
  """The `data.train_through_validation` key (False when absent); with it no validation
  metric can select a step, so `train.select_metric` must be empty."""
  value = bool(config.data.get("train_through_validation", False))
  if value and config.data.protocol != "leave_last_out":
    raise config_lib.ConfigError(
        "config key 'data.train_through_validation' is True, but data.protocol="
        f"{config.data.protocol!r} has no validation split to train through; use "
        "data.protocol=leave_last_out")
  if value and config.train.get("select_metric", ""):
    raise config_lib.ConfigError(
        "config key 'data.train_through_validation' is True (the validation events are "
        f"trained on), but 'train.select_metric' is {config.train.select_metric!r}: nothing "
        "is left to select on. Set train.select_metric='' and train.num_steps to the "
        "selecting run's best_step")
  return value


def exclude_seen(config: ml_collections.ConfigDict) -> bool:
  """The `eval.exclude_seen` key (False when absent)."""
  return bool(config.eval.get("exclude_seen", False))


def protocol(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The evaluation protocol of a ranking run, as every report states it."""
  return {
      "split": config.data.protocol,
      "kcore_users": int(config.data.get("kcore_users", 0) or 0),
      "kcore_items": int(config.data.get("kcore_items", 0) or 0),
      "timestamps": config.data.get("timestamp_precision", "exact"),
      "ranking": "full catalogue",
      "exclude_seen": exclude_seen(config),
      "seen": retrieval.protocol_name(exclude_seen(config)),
      "train_windows": train_windows(config),
      "trained_on": ("train + validation events (refit)" if train_through_validation(config)
                     else "train split"),
      "select_metric": config.train.get("select_metric", "") or "last step",
  }


def compute(result: trainer_lib.TrainResult) -> dict[str, Any]:
  """Compute a run used: steps, loop seconds (this session's, and every session's:
  `train_loop_sec_total`, None for a run resumed from a checkpoint that predates the
  record), events trained on, events/s, best step."""
  out = {"steps": result.step, "train_loop_sec": result.wall_time,
         "train_loop_sec_total": result.total_wall_time,
         "eval_sec": result.eval_seconds, "resumed_from": result.resumed_from}
  if result.selection is not None:
    out.update(best_step=result.selection["best_step"],
               best_value=result.selection["best_value"],
               stopped_early=result.selection["stopped"])
  events = sum(h.get("events", 0.0) for h in result.history)
  if events:
    # Of this process's loop (a resumed run counts only its own steps' time), compile
    # included, evaluations left out.
    out["events"] = int(events)
    if result.resumed_from is None:
      out["events_per_sec"] = events / max(result.wall_time - result.eval_seconds, 1e-9)
  return out


# The summary key of the per-record test values (`paired.per_example`), runs with a context
# check only.
TEST_PER_EXAMPLE = "test_per_example"


def test_summary(config: ml_collections.ConfigDict, result: trainer_lib.TrainResult,
                 data: RankingData, *, ks, start_time: float) -> tuple[dict, dict, dict]:
  """Test-split metrics of a trained ranking model next to popularity, and its summary.

  Returns:
    (model metrics, popularity metrics, summary dict with the combined `metrics`:
    the model's, `popularity/*` and `train/final_loss`).
  """
  check = context_check_applies(config) and data.splits.validation is not None
  model_metrics = retrieval.evaluate_next_item(
      result.model, data.eval_batches(config, data.test), ks=ks,
      ids=range(len(data.test)) if check else None)
  test_full = dict(model_metrics)   # per-example values: the context check, the summary
  per_user = model_metrics.pop(paired.PER_EXAMPLE, None)
  counts = popularity.fit_item_counts(data.train, data.vocab.num_items)
  pop_metrics = popularity.evaluate_popularity(
      counts, data.eval_batches(config, data.test), ks=ks)
  metrics = dict(model_metrics)
  metrics.update({f"popularity/{k}": v for k, v in pop_metrics.items()})
  if result.history:
    metrics["train/final_loss"] = result.history[-1]["loss"]
  summary = {
      "config_name": config.name, "job": config.job, "metrics": metrics,
      "trainable_params": result.trainable_params, "total_params": result.total_params,
      "steps": result.step, "resumed_from": result.resumed_from,
      "wall_time_sec": time.perf_counter() - start_time,
      "train_loop_sec": result.wall_time, "dataset": {
          "path": data.path, "protocol": config.data.protocol,
          "num_items": data.vocab.num_items, "statistics": data.stats},
      "history": result.history, "evals": result.evals, "devices": jax.device_count(),
      "protocol": protocol(config), "compute": compute(result),
      "best_step": result.selection["best_step"] if result.selection else result.step,
  }
  bias = getattr(result.model, "repeat_bias", None)
  if bias is not None:   # the learned score shift of items the input window holds
    summary["repeat_bias"] = float(bias[...])
  if check:
    summary["context_check"] = context_check(result.model, config, data, ks=ks,
                                             test_metrics=test_full)
    # Each test record's values (keyed by record index), so that two runs on the same split
    # compare paired (`eval.paired.difference`), not with the independent-samples error.
    summary[TEST_PER_EXAMPLE] = per_user
  return model_metrics, pop_metrics, summary


def write_report(config: ml_collections.ConfigDict, result: trainer_lib.TrainResult,
                 summary: dict, workdir: str, *, data: RankingData, model_name: str,
                 metrics: dict, pop_metrics: dict, ks, test_noun: str) -> str:
  """Writes summary.json / summary.txt / loss.png of a catalogue-ranking job, prints the text.

  Args:
    model_name: the model's column in the metrics table.
    metrics, pop_metrics: the model's and popularity's test metrics (`test_summary`).
    test_noun: what a test example is ('users', 'records').

  Returns:
    The text report.
  """
  keys = [f"recall@{k}" for k in ks] + ["ndcg@10"]
  table = summary_lib.metrics_table({model_name: metrics, "popularity": pop_metrics}, keys)
  proto = summary["protocol"]
  kcore = (f"{proto['kcore_users']}/{proto['kcore_items']}-core, "
           if proto["kcore_users"] or proto["kcore_items"] else "")
  selected = (f"best step {summary['best_step']} by {proto['select_metric']}"
              + (" (stopped early)" if summary["compute"].get("stopped_early") else "")
              if result.selection else "last step")
  se = ", ".join(f"{k} +- {metrics[k + '_stderr']:.4f}" for k in keys
                 if k + "_stderr" in metrics)
  text = (f"{config.name}: {result.step} steps, {selected}, {result.trainable_params:,} "
          f"trainable / {result.total_params:,} params, {summary['wall_time_sec']:.1f} s "
          f"wall, test {test_noun} {int(metrics.get('num_examples', len(data.test))):,}, "
          f"catalogue {data.vocab.num_items - 2:,} items ({kcore}{config.data.protocol}, "
          f"full-catalogue ranking, {proto['seen']}"
          f"{'; trained on ' + proto['trained_on'] if train_through_validation(config) else ''})"
          f"\n{table}"
          + (f"\nstandard errors ({model_name}): {se}" if se else "")
          + (f"\nlearned repeat bias (added to the score of items the input window holds): "
             f"{summary['repeat_bias']:+.3f}" if "repeat_bias" in summary else "")
          + (f"\n{context_check_text(summary['context_check'])}"
             if "context_check" in summary else ""))
  if result.history:
    eval_key = (proto["select_metric"] if result.selection else "val/recall@10")
    summary_lib.plot_loss(result.history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          result.evals, eval_key=eval_key, title=config.name)
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return text
