"""Text-prompt baseline: the same LLM reads the user's history rendered as text.

Same data, tasks, test sample and metrics as `train_user_llm`; the prompt carries the
history ("Toy Story (1995), rated 4.0, Adventure|Animation; ...", the most recent events
that fit `baseline.history_tokens`) instead of user embeddings. `baseline.strategy`:

  zero_shot   no training: the LLM as loaded answers the prompts
  lora        LoRA adapters on the LLM (config.lora) trained with the User-LLM budget
  full        every LLM parameter trained with the User-LLM budget

(Enc and Proj have no counterpart: there is no encoder or bridge.) Results go to
`WORKDIR/summary.json` / `summary.txt`; training resumes from the workdir's checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax.bridge import soft_prompt
from user_llm_jax.jobs import train_user_llm as common
from user_llm_jax.llm import lora as lora_lib
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import train_step as train_step_lib
from user_llm_jax.train import trainer as trainer_lib

STRATEGIES = ("zero_shot", "lora", "full")


def text_loss(model: Decoder, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """Answer-only next-token loss of the decoder on right-padded task text."""
  tokens = jnp.asarray(batch[ex_lib.TOKENS], jnp.int32)                 # [B,T]
  text_mask = jnp.asarray(batch[ex_lib.TEXT_MASK], bool)                # [B,T]
  loss_mask = jnp.asarray(batch[ex_lib.LOSS_MASK], bool) & text_mask
  logits, _ = model(tokens, positions=soft_prompt.text_positions(text_mask),
                    attention_mask=soft_prompt.text_attention_mask(text_mask))  # [B,T,V]
  loss, count = soft_prompt.next_token_loss(logits, tokens, loss_mask)
  return loss, {"answer_tokens": count}


def trainable(strategy: str) -> Any:
  if strategy == "lora":
    return nnx.All(nnx.Param, nnx.OfType(lora_lib.LoraParam))
  return nnx.Param


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (unless zero-shot) and evaluates the text-prompt baseline; returns the summary."""
  t0 = time.perf_counter()
  summary_lib.remove_stale(workdir)
  strategy = config.baseline.strategy.lower()
  if strategy not in STRATEGIES:
    raise config_lib.ConfigError(f"config key 'baseline.strategy' is "
                                 f"{config.baseline.strategy!r}; expected one of {STRATEGIES}")
  if config.baseline.history_tokens < 1:
    raise config_lib.ConfigError("config key 'baseline.history_tokens' must be >= 1")
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  data = common.load_task_data(config, workdir)
  llm, tokenizer = common.load_llm(config.llm, config.seed)
  with nnx.use_eager_sharding(False):
    common.apply_strategy_lora(llm, config, strategy, config.seed + 2)
  transform = ex_lib.TaskExample(data.vocab, tokenizer, common.example_config(
      config, history_tokens=config.baseline.history_tokens, vocab=data.vocab))
  total = train_step_lib.count_params(llm, nnx.Param)
  steps, history, resumed_from, trained = 0, [], None, 0
  if strategy != "zero_shot":
    mesh, rules = common.mesh_of(config)
    result = trainer_lib.train(
        llm, text_loss, train_cfg, common.train_iterator(data, transform, config, train_cfg),
        mesh=mesh, rules=rules, seed=config.seed, wrt=trainable(strategy), workdir=workdir,
        fingerprint=common.fingerprint(config, baseline_strategy=strategy),
        count_fn=lambda b: int(np.asarray(b[ex_lib.LOSS_MASK]).sum()),
        desc=f"text baseline/{strategy}")
    if result.preempted:
      return {"preempted": True, "step": result.step}
    llm, steps, history = result.model, result.step, result.history
    resumed_from, trained = result.resumed_from, result.trainable_params
  train_time = time.perf_counter() - t0
  t_eval = time.perf_counter()
  metrics = common.evaluate_tasks(eval_lib.text_conditioner(llm), data, transform, config)
  eval_time = time.perf_counter() - t_eval
  prompt_lengths = [len(transform.prompt(dict(data.test[i], task=task), task))
                    for i in common.eval_indices(len(data.test), config.eval.num_examples,
                                                 config.seed)[:50]
                    for task in transform.cfg.tasks[:1]]
  wall = time.perf_counter() - t0
  summary = {
      "config_name": config.name, "job": "text_baseline", "strategy": strategy,
      "metrics": {"text_prompt": metrics}, "trainable_params": trained,
      "total_params": total, "steps": steps, "resumed_from": resumed_from,
      "history_tokens": config.baseline.history_tokens,
      "mean_prompt_tokens": float(np.mean(prompt_lengths)) if prompt_lengths else 0.0,
      "budget": {"steps": steps, "batch_size": train_cfg.batch_size,
                 "examples_seen": steps * train_cfg.batch_size, "train_sec": train_time,
                 "eval_sec": eval_time},
      "wall_time_sec": wall, "history": history, "llm": config.llm.source,
      "dataset": {"path": data.path, "protocol": config.data.protocol,
                  "window": config.data.window, "num_items": data.vocab.num_items},
  }
  table = common.results_table({"text_prompt": metrics}, tuple(config.eval.ks))
  text = (f"{config.name}: text-prompt baseline ({strategy}, history <= "
          f"{config.baseline.history_tokens} tokens, mean prompt "
          f"{summary['mean_prompt_tokens']:.0f} tokens), {steps} steps, {trained:,} trainable / "
          f"{total:,} params, {wall:.1f} s wall\n{table}")
  if history:
    summary_lib.plot_loss(history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          title=f"{config.name} text baseline")
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary
