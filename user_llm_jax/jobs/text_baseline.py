"""Text-prompt baseline: the same LLM reads the user's history rendered as text.

Same data, tasks, test sample and metrics as `train_user_llm`; the prompt carries the
history ("Toy Story (1995), rated 4.0, Adventure|Animation; ...", the most recent events
that fit `baseline.history_tokens`) instead of user embeddings. `baseline.strategy`:

  zero_shot   no training: the LLM as loaded answers the prompts
  lora        LoRA adapters on the LLM (config.lora) trained with the User-LLM budget
  full        every LLM parameter trained with the User-LLM budget

(Enc and Proj have no counterpart: there is no encoder or bridge.) Results go to
`WORKDIR/summary.json` / `summary.txt` (with the row `count_prompt`: the favorite-category
label's rule applied to exactly the events each prompt shows, and the paired verdicts; with
the learning curve of trained strategies:
`runner.curve_metrics` every `train.eval_every` steps, the User-LLM job's procedure, so the
two are comparable point by point); training resumes from the workdir's checkpoint.
The prompts and the reading of a finished run are `text_prompt`'s (`--mode=infer` answers
any users with it).
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import params as params_lib
from user_llm_jax import runs
from user_llm_jax import text_prompt
from user_llm_jax.bridge import soft_prompt
from user_llm_jax.bridge import strategies
from user_llm_jax.eval import floors
from user_llm_jax.eval import paired
from user_llm_jax.llm.losses import next_token_loss
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import setup
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib

JOB = text_prompt.JOB


def text_loss(model: Decoder, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """Answer-only next-token loss of the decoder on right-padded task text."""
  tokens = jnp.asarray(batch[ex_lib.TOKENS], jnp.int32)                 # [B,T]
  text_mask = jnp.asarray(batch[ex_lib.TEXT_MASK], bool)                # [B,T]
  loss_mask = jnp.asarray(batch[ex_lib.LOSS_MASK], bool) & text_mask
  logits, _ = model(tokens, positions=soft_prompt.text_positions(text_mask),
                    attention_mask=soft_prompt.text_attention_mask(text_mask))  # [B,T,V]
  loss, count = next_token_loss(logits, tokens, loss_mask)
  return loss, {"answer_tokens": count}


def prompt_count(data: runner.TaskData, transform: ex_lib.TaskExample,
                 config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{'count_prompt': {favorite_category: metrics}}: the label's rule applied to exactly the
  events each evaluated prompt shows (`floors.counted_category`), on the same test records;
  {} without the favorite-category task."""
  if prompts.FAVORITE_CATEGORY not in tuple(config.tasks.names):
    return {}
  indices = runner.eval_indices(len(data.test), config.eval.num_examples, config.seed)
  records = [dict(data.test[i]) for i in indices]
  shown = [transform.events_shown(r) for r in records]
  return {"count_prompt": {prompts.FAVORITE_CATEGORY: floors.counted_category(
      records, data.vocab, shown, ids=indices, max_categories=int(config.data.max_categories),
      what="the events the text prompt shows")}}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (unless zero-shot) and evaluates the text-prompt baseline; returns the summary."""
  t0 = time.perf_counter()
  strategy = text_prompt.check_config(config)
  train_cfg, mesh, rules = setup.start(config, workdir)
  data = runner.load(config, workdir)
  llm, tokenizer = models.load_llm(config.llm, config.seed)
  lora = models.lora_config(config) if strategy == "lora" else None
  models.apply_lora(llm, lora, config.seed + 2)
  transform = ex_lib.TaskExample(data.vocab, tokenizer,
                                 text_prompt.example_config(config, data.vocab))
  arch = models.architecture(llm=llm.cfg, lora=lora, strategy=strategy)
  description = runs.save_run(workdir, JOB, config, arch, vocab=data.vocab, tokenizer=tokenizer)
  total = params_lib.count_params(llm, nnx.Param)
  steps, history, curve, resumed_from, trained = 0, [], [], None, 0
  if strategy != "zero_shot":
    eval_fn = None
    if runner.wants_curve(config):
      def eval_fn(m: Decoder) -> dict[str, float]:
        return runner.curve_metrics(eval_lib.text_conditioner(m), data, transform, config)
    result = trainer_lib.train(
        llm, text_loss, train_cfg,
        runner.train_iterator(data, transform, config, train_cfg.batch_size),
        mesh=mesh, rules=rules, seed=config.seed, wrt=strategies.text_trainable_filter(strategy),
        workdir=workdir, eval_fn=eval_fn,
        fingerprint=config_lib.fingerprint(config, architecture=arch),
        description=description,
        count_fn=lambda b: int(np.asarray(b[ex_lib.LOSS_MASK]).sum()),
        desc=f"text baseline/{strategy}")
    if result.preempted:
      return {"preempted": True, "step": result.step}
    llm, steps, history, curve = result.model, result.step, result.history, result.evals
    resumed_from, trained = result.resumed_from, result.trainable_params
  train_time = time.perf_counter() - t0
  t_eval = time.perf_counter()
  metrics = runner.evaluate_tasks(eval_lib.text_conditioner(llm), data, transform, config)
  eval_time = time.perf_counter() - t_eval
  rows = {"text_prompt": metrics, **prompt_count(data, transform, config)}
  # Over every evaluated example of every task (the prompts hold the history).
  counts = [(m["mean_prompt_tokens"], m["num_examples"]) for m in metrics.values()]
  mean_prompt = (sum(t * n for t, n in counts) / max(sum(n for _, n in counts), 1))
  wall = time.perf_counter() - t0
  summary = {
      "config_name": config.name, "job": JOB, "strategy": strategy,
      "metrics": rows, "verdicts": paired.verdicts(rows), "trainable_params": trained,
      "total_params": total, "steps": steps, "resumed_from": resumed_from,
      "history_tokens": config.baseline.history_tokens,
      "mean_prompt_tokens": float(mean_prompt),
      "budget": {"steps": steps, "batch_size": train_cfg.batch_size,
                 "examples_seen": steps * train_cfg.batch_size, "train_sec": train_time,
                 "eval_sec": eval_time},
      "wall_time_sec": wall, "history": history, "curve": curve, "llm": config.llm.source,
      "dataset": {"path": data.path, "protocol": config.data.protocol,
                  "window": config.data.window, "num_items": data.vocab.num_items},
  }
  table = runner.results_table(rows, tuple(config.eval.ks))
  text = (f"{config.name}: text-prompt baseline ({strategy}, history <= "
          f"{config.baseline.history_tokens} tokens, mean prompt "
          f"{summary['mean_prompt_tokens']:.0f} tokens over every evaluated example), "
          f"{steps} steps, {trained:,} trainable / {total:,} params, {wall:.1f} s wall\n{table}")
  if summary["verdicts"]:
    text += "\nverdicts (a difference under two standard errors is a tie):\n" + "\n".join(
        f"  {v}" for v in summary["verdicts"])
  if history:
    summary_lib.plot_loss(history, summary_lib.loss_png(workdir), evals=curve,
                          eval_key="fav_acc", title=f"{config.name} text baseline")
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary
