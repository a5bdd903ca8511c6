"""Encoder pretraining job: data -> prepare -> Grain -> UserEncoder -> train -> evaluate.

Evaluation ranks the whole catalogue for each test user's held-out last event
(leave-last-out) and reports Recall@K / NDCG@10 (with standard errors) of the encoder's
next-item head next to a popularity baseline fitted on the same training split, under the
protocol the config names (k-core, seen items excluded or not: `ranking.protocol`). With
`train.select_metric` (e.g. 'val/ndcg@10') the test numbers are the best validation
step's, training stops after `train.patience` evaluations without improvement, and the
best step is in the summary (`best_step`). The run's description (resolved
config, encoder architecture, vocabulary) goes to `WORKDIR/run.json`, results to
`WORKDIR/summary.json`, `WORKDIR/summary.txt` and the training curve to `WORKDIR/loss.png`.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.eval import ranking
from user_llm_jax.train import setup
from user_llm_jax.train import trainer as trainer_lib

JOB = "pretrain_encoder"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the job; returns the summary dict (or a preemption note)."""
  t0 = time.perf_counter()
  train_cfg, mesh, rules = setup.start(config, workdir)
  ks = tuple(int(k) for k in config.eval.ks)
  data = ranking.RankingData.load(config, workdir)
  eval_fn = data.validation_fn(config, ks)
  if train_cfg.select_metric and eval_fn is None:
    raise config_lib.ConfigError(
        f"config key 'train.select_metric' is {train_cfg.select_metric!r}, but "
        f"data.protocol={config.data.protocol!r} has no validation split to select on; use "
        "data.protocol=leave_last_out or set train.select_metric=''")
  model_section = dict(config.encoder.model)
  if data.vocab.num_categories <= schema.FIRST_ID:
    # Reviews without metadata (e.g. an Amazon category without its meta file): no
    # categories to read or predict. Said here, and recorded in the run's architecture.
    print(f"{config.name}: the dataset has no item categories; the encoder reads and "
          "predicts none (use_categories=False, category_loss_weight=0)", flush=True)
    model_section.update(use_categories=False, category_loss_weight=0.0)
  enc = models.encoder_config_from(model_section, data.vocab, window=config.data.window,
                                   max_categories=config.data.max_categories)
  model = models.build_encoder(enc, config.seed)
  arch = models.architecture(encoder=enc)
  description = runs.save_run(workdir, JOB, config, arch, vocab=data.vocab)

  result = trainer_lib.train(
      model, lambda m, batch: m.pretrain_loss(batch, deterministic=False), train_cfg,
      data.train_iterator(config, train_cfg.batch_size), mesh=mesh, rules=rules,
      seed=config.seed, workdir=workdir, eval_fn=eval_fn,
      fingerprint=config_lib.fingerprint(config, encoder_architecture=arch["encoder"]),
      description=description, count_fn=lambda b: int(b[transforms_lib.MASK].sum()),
      desc="pretrain encoder")
  if result.preempted:
    return {"preempted": True, "step": result.step}

  encoder_metrics, pop_metrics, summary = ranking.test_summary(config, result, data, ks=ks,
                                                               start_time=t0)
  summary["encoder"] = arch["encoder"]
  ranking.write_report(config, result, summary, workdir, data=data, model_name="encoder",
                       metrics=encoder_metrics, pop_metrics=pop_metrics, ks=ks,
                       test_noun="users")
  return summary
