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


def _fingerprint(config: ml_collections.ConfigDict,
                 enc: encoder_config.EncoderConfig) -> dict[str, Any]:
  model = {k: (jnp.dtype(v).name if k.endswith("dtype") else v)
           for k, v in dataclasses.asdict(enc).items()}
  data = config_lib.to_plain(config.data)
  data.pop("worker_count", None)  # Parallelism does not change what is read.
  for key in ("manual_dir", "data_dir"):
    if data[key]:
      data[key] = os.path.abspath(os.path.expanduser(data[key]))
  return {"model": model, "data": data, "seed": config.seed,
          "batch_size": config.train.batch_size}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the job; returns the summary dict (or a preemption note)."""
  t0 = time.perf_counter()
  summary_lib.remove_stale(workdir)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  ks = tuple(int(k) for k in config.eval.ks)
  mesh = sharding_lib.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding_lib.DEFAULT_RULES
  if train_cfg.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config key 'train.batch_size'={train_cfg.batch_size} must divide evenly over "
        f"{jax.process_count()} processes")

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

  enc = encoder_config_from(
      config.model, num_items=vocab.num_items, num_ratings=vocab.num_ratings,
      num_categories=vocab.num_categories, window=config.data.window,
      max_categories=config.data.max_categories)
  with nnx.use_eager_sharding(False):
    model = encoder_model.UserEncoder(
        enc, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

  transforms = [transforms_lib.CropAndPad(config.data.window, config.data.max_categories)]
  train_iter = iter(pipeline_lib.make_pipeline(
      train_src, batch_size=train_cfg.batch_size // jax.process_count(), seed=config.seed,
      shuffle=True, num_epochs=None, transforms=transforms,
      worker_count=config.data.worker_count))

  def eval_batches(src):
    return pipeline_lib.make_eval_pipeline(src, batch_size=config.eval.batch_size,
                                           transforms=transforms)

  eval_fn = None
  if val_src is not None:
    eval_fn = lambda m: {f"val/{k}": v for k, v in retrieval.evaluate_next_item(
        m, eval_batches(val_src), ks=ks).items() if k != "num_examples"}

  def loss_fn(m, batch):
    return m.pretrain_loss(batch, deterministic=False)

  result = trainer_lib.train(
      model, loss_fn, train_cfg, train_iter, mesh=mesh, rules=rules, seed=config.seed,
      workdir=workdir, eval_fn=eval_fn, fingerprint=_fingerprint(config, enc),
      count_fn=lambda b: int(b[transforms_lib.MASK].sum()), desc="pretrain encoder")
  if result.preempted:
    return {"preempted": True, "step": result.step}

  encoder_metrics, pop_metrics, summary = test_summary(
      config, result, train_src, eval_batches(test_src), eval_batches(test_src),
      vocab=vocab, prepared=prepared, stats=stats, ks=ks, start_time=t0)
  wall = summary["wall_time_sec"]
  summary["encoder"] = _fingerprint(config, enc)["model"]
  keys = [f"recall@{k}" for k in ks] + ["ndcg@10"]
  table = summary_lib.metrics_table({"encoder": encoder_metrics, "popularity": pop_metrics},
                                    keys)
  text = (f"{config.name}: {result.step} steps, {result.trainable_params:,} trainable / "
          f"{result.total_params:,} params, {wall:.1f} s wall, test users "
          f"{int(encoder_metrics.get('num_examples', len(test_src))):,}, catalogue "
          f"{vocab.num_items - 2:,} items ({config.data.protocol}, full-catalogue ranking)\n{table}")
  if result.history:
    summary_lib.plot_loss(result.history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          result.evals, eval_key="val/recall@10", title=config.name)
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary


def test_summary(config: ml_collections.ConfigDict, result: trainer_lib.TrainResult,
                 train_src, model_batches, popularity_batches, *, vocab, prepared: str,
                 stats: dict, ks, start_time: float) -> tuple[dict, dict, dict]:
  """Test-split metrics of a trained retrieval model next to popularity, and its summary.

  Shared by every job that ranks the whole catalogue (encoder pretraining, dual encoder).

  Returns:
    (model metrics, popularity metrics, summary dict with the combined `metrics`:
    the model's, `popularity/*` and `train/final_loss`).
  """
  model_metrics = retrieval.evaluate_next_item(result.model, model_batches, ks=ks)
  counts = popularity.fit_item_counts(train_src, vocab.num_items)
  pop_metrics = popularity.evaluate_popularity(counts, popularity_batches, ks=ks)
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
          "path": prepared, "protocol": config.data.protocol,
          "num_items": vocab.num_items, "statistics": stats},
      "history": result.history, "evals": result.evals, "devices": jax.device_count(),
  }
  return model_metrics, pop_metrics, summary
