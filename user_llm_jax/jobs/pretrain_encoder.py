"""Encoder pretraining job: data -> prepare -> Grain -> UserEncoder -> train -> evaluate.

Evaluation ranks the whole catalogue for each test user's held-out last event
(leave-last-out) and reports Recall@K / NDCG@10 of the encoder's next-item head next to a
popularity baseline fitted on the same training split. Results go to `WORKDIR/summary.json`,
`WORKDIR/summary.txt` and the training curve to `WORKDIR/loss.png`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipelines import records
from user_llm_jax import config as config_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import source as source_lib
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.encoder import config as encoder_config
from user_llm_jax.encoder import model as encoder_model
from user_llm_jax.eval import popularity
from user_llm_jax.eval import retrieval
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib

PRESETS = {"paper": encoder_config.ENCODER_PAPER, "tiny": encoder_config.ENCODER_TINY}
SYNTHETIC_META = "synthetic_config.json"


def encoder_config_from(model: ml_collections.ConfigDict, *, num_items: int,
                        num_ratings: int, num_categories: int, window: int,
                        max_categories: int) -> encoder_config.EncoderConfig:
  """`config.model` (preset + overrides) and the data's sizes -> `EncoderConfig`."""
  section = dict(model)
  preset = section.pop("preset")
  if preset not in PRESETS:
    raise config_lib.ConfigError(
        f"config key 'model.preset' is {preset!r}; expected one of {sorted(PRESETS)}")
  for key in ("dtype", "param_dtype"):
    if section.get(key) is not None:
      try:
        section[key] = jnp.dtype(section[key]).type
      except TypeError as e:
        raise config_lib.ConfigError(
            f"config key 'model.{key}' is {section[key]!r}; expected a dtype name such as "
            "'float32' or 'bfloat16'") from e
  return config_lib.to_dataclass(
      encoder_config.EncoderConfig, section, "model", base=PRESETS[preset],
      num_items=num_items, num_ratings=num_ratings, num_categories=num_categories,
      max_len=window, max_categories=max_categories)


def _synthetic_raw(data: ml_collections.ConfigDict, workdir: str) -> tuple[str, bool]:
  """Generates the synthetic dataset into WORKDIR/raw (reused if its settings match).

  Returns:
    (raw directory, whether it was (re)generated now).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  options = dict(data.synthetic)
  valid = set(inspect.signature(synthetic.generate).parameters) - {"out_dir"}
  unknown = sorted(set(options) - valid)
  if unknown:
    raise config_lib.ConfigError(
        f"unknown config key 'data.synthetic.{unknown[0]}'; synthetic.generate accepts: "
        + ", ".join(sorted(valid)))
  raw = os.path.join(workdir, "raw")
  meta_path = os.path.join(raw, SYNTHETIC_META)
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      if json.load(f) == options:
        return raw, False
  # Generate beside, then rename: an interrupted generation is never mistaken for data.
  tmp = raw + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  synthetic.generate(tmp, **options)
  with open(os.path.join(tmp, SYNTHETIC_META), "w", encoding="utf-8") as f:
    json.dump(options, f)
  shutil.rmtree(raw, ignore_errors=True)
  os.replace(tmp, raw)
  return raw, True


def prepare_data(data: ml_collections.ConfigDict, workdir: str) -> str:
  """Raw files (real `manual_dir` or the synthetic default) -> a prepared dataset path."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  force = False
  if data.manual_dir:
    manual_dir = os.path.abspath(os.path.expanduser(data.manual_dir))
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(
          f"config key 'data.manual_dir' points to {manual_dir!r}, which does not exist or "
          "is not a directory (expected the raw dataset files, e.g. ratings.csv and movies.csv)")
  else:
    manual_dir, force = _synthetic_raw(data, workdir)
  data_dir = data.data_dir or os.path.join(workdir, "data")
  prepared = prepare.prepare_dataset(
      data.dataset, manual_dir, data_dir, protocol=data.protocol, window=data.window,
      force=force)
  return prepared.path


def data_fingerprint(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `data` section as it identifies a run's input (absolute paths, no parallelism)."""
  plain = config_lib.to_plain(data)
  plain.pop("worker_count", None)  # Parallelism does not change what is read.
  for key in ("manual_dir", "data_dir"):
    if plain[key]:
      plain[key] = os.path.abspath(os.path.expanduser(plain[key]))
  return plain


def _fingerprint(config: ml_collections.ConfigDict,
                 enc: encoder_config.EncoderConfig) -> dict[str, Any]:
  model = {k: (jnp.dtype(v).name if k.endswith("dtype") else v)
           for k, v in dataclasses.asdict(enc).items()}
  return {"model": model, "data": data_fingerprint(config.data), "seed": config.seed,
          "batch_size": config.train.batch_size}


@dataclasses.dataclass(frozen=True)
class RetrievalData:
  """A prepared dataset's splits and batching, for the jobs that rank the whole catalogue.

  Attributes:
    path: the prepared dataset directory.
    train, test: the splits' record sources.
    validation: the validation split, or None (the paper protocol has none).
    vocab: the dataset's vocabulary sizes.
    stats: the dataset statistics written at preparation.
    transforms: record -> fixed-shape example (crop to the window, pad).
  """

  path: str
  train: Any
  test: Any
  validation: Any | None
  vocab: Any
  stats: dict
  transforms: tuple[Any, ...]

  def train_iterator(self, config: ml_collections.ConfigDict, batch_size: int):
    """Endless shuffled training batches (`batch_size` is global; each process reads its share)."""
    return iter(pipeline_lib.make_pipeline(
        self.train, batch_size=batch_size // jax.process_count(), seed=config.seed,
        shuffle=True, num_epochs=None, transforms=list(self.transforms),
        worker_count=config.data.worker_count))

  def eval_batches(self, config: ml_collections.ConfigDict, src):
    """One pass over `src` in `config.eval.batch_size` batches."""
    return pipeline_lib.make_eval_pipeline(src, batch_size=config.eval.batch_size,
                                           transforms=list(self.transforms))

  def validation_fn(self, config: ml_collections.ConfigDict, ks: tuple[int, ...]):
    """`model -> {'val/<metric>': value}` on the validation split, or None without one."""
    if self.validation is None:
      return None
    return lambda m: {f"val/{k}": v for k, v in retrieval.evaluate_next_item(
        m, self.eval_batches(config, self.validation), ks=ks).items() if k != "num_examples"}


def load_retrieval_data(config: ml_collections.ConfigDict, workdir: str) -> RetrievalData:
  """Prepares `config.data` (or reuses it) and loads its splits.

  Raises:
    BadInputError: the train or the test split is empty.
  """
  prepared = prepare_data(config.data, workdir)
  train_src, vocab, stats = source_lib.load_prepared(prepared, "train")
  test_src, _, _ = source_lib.load_prepared(prepared, "test")
  try:
    val_src = source_lib.load_prepared(prepared, "validation")[0]
  except KeyError:  # The paper protocol has no validation split.
    val_src = None
  if len(train_src) == 0 or len(test_src) == 0:
    raise records.BadInputError(f"prepared dataset {prepared!r} has an empty split "
                                f"(train={len(train_src)}, test={len(test_src)} records)")
  transforms = (transforms_lib.CropAndPad(config.data.window, config.data.max_categories),)
  return RetrievalData(prepared, train_src, test_src, val_src, vocab, stats, transforms)


def start_job(config: ml_collections.ConfigDict, workdir: str):
  """Removes a previous run's reports and reads the train / eval / mesh sections.

  Returns:
    (TrainConfig, the k of Recall@k, device mesh, logical axis rules).
  """
  summary_lib.remove_stale(workdir)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  ks = tuple(int(k) for k in config.eval.ks)
  mesh = sharding_lib.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding_lib.DEFAULT_RULES
  return train_cfg, ks, mesh, rules


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the job; returns the summary dict (or a preemption note)."""
  t0 = time.perf_counter()
  train_cfg, ks, mesh, rules = start_job(config, workdir)
  if train_cfg.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config key 'train.batch_size'={train_cfg.batch_size} must divide evenly over "
        f"{jax.process_count()} processes")

  data = load_retrieval_data(config, workdir)
  enc = encoder_config_from(
      config.model, num_items=data.vocab.num_items, num_ratings=data.vocab.num_ratings,
      num_categories=data.vocab.num_categories, window=config.data.window,
      max_categories=config.data.max_categories)
  with nnx.use_eager_sharding(False):
    model = encoder_model.UserEncoder(
        enc, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

  def loss_fn(m, batch):
    return m.pretrain_loss(batch, deterministic=False)

  result = trainer_lib.train(
      model, loss_fn, train_cfg, data.train_iterator(config, train_cfg.batch_size),
      mesh=mesh, rules=rules, seed=config.seed, workdir=workdir,
      eval_fn=data.validation_fn(config, ks), fingerprint=_fingerprint(config, enc),
      count_fn=lambda b: int(b[transforms_lib.MASK].sum()), desc="pretrain encoder")
  if result.preempted:
    return {"preempted": True, "step": result.step}

  encoder_metrics, pop_metrics, summary = test_summary(config, result, data, ks=ks,
                                                       start_time=t0)
  summary["encoder"] = _fingerprint(config, enc)["model"]
  write_report(config, result, summary, workdir, data=data, model_name="encoder",
               metrics=encoder_metrics, pop_metrics=pop_metrics, ks=ks, test_noun="users")
  return summary


def test_summary(config: ml_collections.ConfigDict, result: trainer_lib.TrainResult,
                 data: RetrievalData, *, ks, start_time: float) -> tuple[dict, dict, dict]:
  """Test-split metrics of a trained retrieval model next to popularity, and its summary.

  Shared by every job that ranks the whole catalogue (encoder pretraining, dual encoder).

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
                 summary: dict, workdir: str, *, data: RetrievalData, model_name: str,
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
