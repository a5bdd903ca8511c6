"""Dual-encoder baseline job: prepared timelines -> user tower vs item tower -> Recall@K.

Trains `baselines.dual_encoder.DualEncoder` with the in-batch softmax on the same prepared
data as the encoder pretraining (leave-last-out or the paper's sliding-window protocol),
then ranks the whole catalogue for every test record (the item tower embeds every item)
and reports Recall@1/5/10, NDCG@10 and MRR next to popularity, in `WORKDIR/summary.json`
and `WORKDIR/summary.txt`; the training curve goes to `WORKDIR/loss.png`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ml_collections
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.baselines import dual_encoder as dual_lib
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.eval import ranking
from user_llm_jax.train import setup
from user_llm_jax.train import trainer as trainer_lib

JOB = "dual_encoder"


def dual_config_from(section: ml_collections.ConfigDict) -> dual_lib.DualEncoderConfig:
  """`config.dual_encoder` -> `DualEncoderConfig` (errors name the key)."""
  try:
    return config_lib.to_dataclass(dual_lib.DualEncoderConfig, section, "dual_encoder")
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def build_model(config: ml_collections.ConfigDict, vocab) -> dual_lib.DualEncoder:
  """The dual encoder for the prepared vocabulary (user tower from `config.encoder.model`)."""
  enc = models.encoder_config_from(config.encoder.model, vocab, window=config.data.window,
                                   max_categories=config.data.max_categories)
  cfg = dual_config_from(config.dual_encoder)
  table = dual_lib.item_category_table(vocab, config.data.max_categories)
  with nnx.use_eager_sharding(False):
    return dual_lib.DualEncoder(cfg, enc, table,
                                rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates the dual encoder; returns the summary dict."""
  t0 = time.perf_counter()
  train_cfg, mesh, rules = setup.start(config, workdir)
  ks = tuple(int(k) for k in config.eval.ks)
  data = ranking.RankingData.load(config, workdir)
  model = build_model(config, data.vocab)
  arch = models.architecture(encoder=model.user_tower.cfg)
  arch["dual_encoder"] = dataclasses.asdict(model.cfg)
  description = runs.save_run(workdir, JOB, config, arch, vocab=data.vocab)
  result = trainer_lib.train(
      model, lambda m, batch: m.loss(batch, deterministic=False), train_cfg,
      data.train_iterator(config, train_cfg.batch_size), mesh=mesh, rules=rules,
      seed=config.seed, workdir=workdir, eval_fn=data.validation_fn(config, ks),
      fingerprint=config_lib.fingerprint(config, architecture=arch), description=description,
      count_fn=lambda b: int(b[transforms_lib.MASK].sum()), desc="dual encoder")
  if result.preempted:
    return {"preempted": True, "step": result.step}

  dual_metrics, pop_metrics, summary = ranking.test_summary(
      config, result, data, ks=ks, start_time=t0)
  summary["eval_protocol"] = ("full-catalogue ranking of each test record's target by the item "
                              "tower (no sampled negatives; ties broken by item id)")
  summary["model"] = arch
  ranking.write_report(
      config, result, summary, workdir, data=data, model_name="dual_encoder",
      metrics=dual_metrics, pop_metrics=pop_metrics, ks=ks, test_noun="records")
  return summary
