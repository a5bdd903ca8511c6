"""Jobs that rank the whole catalogue (encoder pretraining, dual encoder): batches and report.

`RankingData` adds the record -> example transform and batching to a prepared dataset's
splits; `test_summary` evaluates a trained ranking model on the test split next to the
popularity baseline fitted on the same training split, and `write_report` writes
`summary.json`, `summary.txt` and the loss / validation plot.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.eval import popularity
from user_llm_jax.eval import retrieval
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class RankingData:
  """A prepared dataset's splits with the encoder's crop, batched for training and ranking."""

  splits: prepared.Splits
  transforms: tuple[Any, ...]

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: str) -> "RankingData":
    return cls(prepared.load_splits(config.data, workdir), (prepared.crop(config.data),))

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
    return iter(pipeline_lib.make_pipeline(
        self.splits.train, batch_size=batch_size // jax.process_count(), seed=config.seed,
        shuffle=True, num_epochs=None, transforms=list(self.transforms),
        worker_count=config.data.worker_count))

  def eval_batches(self, config: ml_collections.ConfigDict, src):
    """One pass over `src` in `config.eval.batch_size` batches."""
    return pipeline_lib.make_eval_pipeline(src, batch_size=config.eval.batch_size,
                                           transforms=list(self.transforms))

  def validation_fn(self, config: ml_collections.ConfigDict, ks: Sequence[int],
                    ) -> Callable[[Any], dict[str, float]] | None:
    """`model -> {'val/<metric>': value}` on the validation split, or None without one."""
    if self.splits.validation is None:
      return None
    return lambda m: {f"val/{k}": v for k, v in retrieval.evaluate_next_item(
        m, self.eval_batches(config, self.splits.validation), ks=ks).items()
                      if k != "num_examples"}


def test_summary(config: ml_collections.ConfigDict, result: trainer_lib.TrainResult,
                 data: RankingData, *, ks, start_time: float) -> tuple[dict, dict, dict]:
  """Test-split metrics of a trained ranking model next to popularity, and its summary.

  Returns:
    (model metrics, popularity metrics, summary dict with the combined `metrics`:
    the model's, `popularity/*` and `train/final_loss`).
  """
  model_metrics = retrieval.evaluate_next_item(
      result.model, data.eval_batches(config, data.test), ks=ks)
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
  }
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
  text = (f"{config.name}: {result.step} steps, {result.trainable_params:,} trainable / "
          f"{result.total_params:,} params, {summary['wall_time_sec']:.1f} s wall, test "
          f"{test_noun} {int(metrics.get('num_examples', len(data.test))):,}, catalogue "
          f"{data.vocab.num_items - 2:,} items ({config.data.protocol}, full-catalogue "
          f"ranking)\n{table}")
  if result.history:
    summary_lib.plot_loss(result.history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          result.evals, eval_key="val/recall@10", title=config.name)
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return text
