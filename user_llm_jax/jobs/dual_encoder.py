"""Dual-encoder baseline job: prepared timelines -> user tower vs item tower -> Recall@K.

Trains `baselines.dual_encoder.DualEncoder` with the in-batch softmax on the same prepared
data as the encoder pretraining (leave-last-out or the paper's sliding-window protocol),
then ranks the whole catalogue for every test record (the item tower embeds every item)
and reports Recall@1/5/10, NDCG@10 and MRR next to popularity, in `WORKDIR/summary.json`
and `WORKDIR/summary.txt`; the training curve goes to `WORKDIR/loss.png`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from data_pipelines import records
from user_llm_jax import config as config_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.baselines import dual_encoder as dual_lib
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import source as source_lib
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.eval import retrieval
from user_llm_jax.jobs import pretrain_encoder
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib


def dual_config_from(section: ml_collections.ConfigDict) -> dual_lib.DualEncoderConfig:
  """`config.dual_encoder` -> `DualEncoderConfig` (errors name the key)."""
  try:
    return config_lib.to_dataclass(dual_lib.DualEncoderConfig, section, "dual_encoder")
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def build_model(config: ml_collections.ConfigDict, vocab) -> dual_lib.DualEncoder:
  """The dual encoder for the prepared vocabulary (user tower from `config.model`)."""
  enc = pretrain_encoder.encoder_config_from(
      config.model, num_items=vocab.num_items, num_ratings=vocab.num_ratings,
      num_categories=vocab.num_categories, window=config.data.window,
      max_categories=config.data.max_categories)
  cfg = dual_config_from(config.dual_encoder)
  table = dual_lib.item_category_table(vocab, config.data.max_categories)
  with nnx.use_eager_sharding(False):
    return dual_lib.DualEncoder(cfg, enc, table,
                                rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def _fingerprint(config: ml_collections.ConfigDict, model: dual_lib.DualEncoder) -> dict:
  data = config_lib.to_plain(config.data)
  data.pop("worker_count", None)
  for key in ("manual_dir", "data_dir"):
    if data[key]:
      data[key] = os.path.abspath(os.path.expanduser(data[key]))
  enc = {k: str(v) for k, v in dataclasses.asdict(model.user_tower.cfg).items()}
  return {"model": enc, "dual_encoder": dataclasses.asdict(model.cfg), "data": data,
          "seed": config.seed, "batch_size": config.train.batch_size}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates the dual encoder; returns the summary dict."""
  t0 = time.perf_counter()
  summary_lib.remove_stale(workdir)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  ks = tuple(int(k) for k in config.eval.ks)
  mesh = sharding_lib.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding_lib.DEFAULT_RULES

  prepared = pretrain_encoder.prepare_data(config.data, workdir)
  train_src, vocab, stats = source_lib.load_prepared(prepared, "train")
  test_src, _, _ = source_lib.load_prepared(prepared, "test")
  try:
    val_src = source_lib.load_prepared(prepared, "validation")[0]
  except KeyError:  # the paper protocol has no validation split
    val_src = None
  if len(train_src) == 0 or len(test_src) == 0:
    raise records.BadInputError(f"prepared dataset {prepared!r} has an empty split "
                                f"(train={len(train_src)}, test={len(test_src)} records)")
  model = build_model(config, vocab)

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

  result = trainer_lib.train(
      model, lambda m, batch: m.loss(batch, deterministic=False), train_cfg, train_iter,
      mesh=mesh, rules=rules, seed=config.seed, workdir=workdir, eval_fn=eval_fn,
      fingerprint=_fingerprint(config, model),
      count_fn=lambda b: int(b[transforms_lib.MASK].sum()), desc="dual encoder")
  if result.preempted:
    return {"preempted": True, "step": result.step}

  dual_metrics, pop_metrics, summary = pretrain_encoder.test_summary(
      config, result, train_src, eval_batches(test_src), eval_batches(test_src),
      vocab=vocab, prepared=prepared, stats=stats, ks=ks, start_time=t0)
  wall = summary["wall_time_sec"]
  summary["eval_protocol"] = ("full-catalogue ranking of each test record's target by the item "
                              "tower (no sampled negatives; ties broken by item id)")
  summary["model"] = _fingerprint(config, model)
  keys = [f"recall@{k}" for k in ks] + ["ndcg@10"]
  table = summary_lib.metrics_table({"dual_encoder": dual_metrics, "popularity": pop_metrics},
                                    keys)
  text = (f"{config.name}: {result.step} steps, {result.trainable_params:,} trainable / "
          f"{result.total_params:,} params, {wall:.1f} s wall, test records "
          f"{int(dual_metrics.get('num_examples', len(test_src))):,}, catalogue "
          f"{vocab.num_items - 2:,} items ({config.data.protocol}, full-catalogue ranking)\n"
          f"{table}")
  if result.history:
    summary_lib.plot_loss(result.history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          result.evals, eval_key="val/recall@10", title=config.name)
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary
