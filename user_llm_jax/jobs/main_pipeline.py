"""The README's main job: the whole system end to end on the embedded synthetic data.

Stages (each in its own subdirectory of WORKDIR; a finished stage is reused on rerun when
its config is unchanged, and an interrupted one resumes from its checkpoint):

  1. data       generate the synthetic MovieLens-format dataset (WORKDIR/raw) and prepare
                it (WORKDIR/data)
  2. encoder    pretrain the user encoder (WORKDIR/encoder; job `pretrain_encoder`)
  3. user_llm   train User-LLM on the tasks with the pretrained encoder (WORKDIR/user_llm;
                job `train_user_llm`), with its shuffled-context control
  4. text       the text-prompt baseline with the same LLM on the same test examples
                (WORKDIR/text_baseline; job `text_baseline`)
  5. report     results table (every method's metric +- standard error and number of test
                users, estimated FLOPs and measured seconds per answer), whether User-LLM
                beats the floors and the text prompt by more than two standard errors, the
                exact counts of what each method reads (the favorite-genre label's rule on
                the encoder's window and on the text prompt's events: how much of its
                input a method uses) and a linear probe of the encoder's states (whether
                they still carry the answer), and one personalized generation, in
                WORKDIR/summary.json + summary.txt

Stages are run through the job registry (`jobs.resolve`), never by importing other jobs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from user_llm_jax import config as config_lib
from user_llm_jax import inference
from user_llm_jax import jobs
from user_llm_jax import runs
from user_llm_jax.data import prepared
from user_llm_jax.eval import cost
from user_llm_jax.eval import paired
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import summary as summary_lib


class StageConfigChanged(config_lib.ConfigError):
  """A finished stage was run with a config that differs from the current one."""


def _stage(name: str, config: ml_collections.ConfigDict, stage_dir: str) -> dict[str, Any]:
  """Runs (or reuses, when finished with the same config) one stage; returns its summary."""
  summary_path = os.path.join(stage_dir, summary_lib.SUMMARY_JSON)
  run_path = os.path.join(stage_dir, runs.RUN_JSON)
  if os.path.exists(summary_path) and os.path.exists(run_path):
    with open(run_path, encoding="utf-8") as f:
      saved = ml_collections.ConfigDict(json.load(f)["config"])
    old, new = config_lib.fingerprint(saved), config_lib.fingerprint(config)
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True,
                                                                   default=str):
      keys = config_lib.differing_keys(old, new)
      raise StageConfigChanged(
          f"stage {name} in {stage_dir} finished with a different config ({', '.join(keys[:5])}"
          "); use a fresh --workdir, or delete that stage's directory to rerun it")
    print(f"[main] stage {name}: already finished in {stage_dir}, reusing", flush=True)
    with open(summary_path, encoding="utf-8") as f:
      return json.load(f)
  print(f"[main] stage {name} -> {stage_dir}", flush=True)
  os.makedirs(stage_dir, exist_ok=True)
  t0 = time.perf_counter()
  out = jobs.resolve(config.job)(config, stage_dir)
  if out.get("preempted"):
    raise SystemExit(f"[main] stage {name} preempted at step {out['step']}; rerun to resume")
  out["stage_sec"] = time.perf_counter() - t0
  return out


def stage_configs(config: ml_collections.ConfigDict,
                  workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """The config of each training stage, all reading the data prepared in WORKDIR."""
  base = ml_collections.ConfigDict(config.to_dict())
  base.data.manual_dir = config.data.manual_dir or os.path.join(workdir, "raw")
  base.data.data_dir = config.data.data_dir or os.path.join(workdir, "data")
  # Encoder pretraining reads only its own keys, so a change of the LLM stages does not
  # invalidate it.
  enc = ml_collections.ConfigDict()
  enc.job, enc.name, enc.seed = "pretrain_encoder", f"{config.name}/encoder", config.seed
  enc.data = ml_collections.ConfigDict(base.data.to_dict())
  enc.encoder = ml_collections.ConfigDict({"model": config.encoder.model.to_dict()})
  enc.train = ml_collections.ConfigDict(config.encoder.train.to_dict())
  enc.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  enc.eval = ml_collections.ConfigDict({"batch_size": 256, "ks": tuple(config.eval.ks)})
  ullm = ml_collections.ConfigDict(base.to_dict())
  ullm.job = "train_user_llm"
  ullm.encoder.init = "pretrained"
  ullm.encoder.workdir = os.path.join(workdir, "encoder")
  text = ml_collections.ConfigDict(base.to_dict())
  text.job = "text_baseline"
  text.eval.shuffled_control = False
  if "align" in text:  # User-LLM's alignment stage: the text prompt has no bridge to align
    text.align.steps = 0
  return {"encoder": enc, "user_llm": ullm, "text_baseline": text}


def personalized_generation(trained: tuple, config: ml_collections.ConfigDict,
                            data: runner.TaskData, top_k: int = 5) -> dict[str, Any]:
  """One test user's recent history and the trained User-LLM's answers to the tasks.

  Next item: the item head's top `top_k` titles when the model ranks the catalogue with it
  (no titles were trained), else a generated title.
  """
  model, tokenizer, vocab, run = trained   # inference.load_trained(...)
  transform = ex_lib.TaskExample(vocab, tokenizer,
                                 runner.example_config(run.config, vocab=vocab))
  index = runner.eval_indices(len(data.test), config.eval.num_examples, config.seed)[0]
  record = dict(data.test[index])
  events = transform.history_events(record)
  out = {"user": ex_lib.text_of(record["user_id"]), "history_events": len(events),
         "recent": events[-5:], "answers": {}}
  for task in transform.cfg.tasks:
    example = transform.map(dict(record, task=task))
    if task == prompts.NEXT_ITEM and not transform.cfg.next_item_titles:
      scores = np.asarray(model.next_item_logits(ex_lib.collate([example])))[0]
      best = np.argsort(-scores, kind="stable")[:top_k]
      answer = "; ".join(vocab.items[int(i)].title for i in best)
    else:
      # A few tokens of slack beyond the trained answer length: a free-form answer may
      # be a little longer than the reference.
      answer = inference.answer(model, tokenizer, example, ex_lib.prompt_of(example),
                                transform.cfg.max_answer_tokens + 8)
    out["answers"][task] = {"question": prompts.question(transform.cfg.spec, task),
                            "model": answer, "truth": transform.answer_text(record, task)}
  return out


def _flops_per_answer(model: Any, window: int,
                      metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Estimated FLOPs of reading the user + prompt once, per method (see `eval.cost`)."""
  mean_prompt = lambda by_task: float(np.mean([m["mean_prompt_tokens"]
                                               for m in by_task.values()]))
  return {"user_llm": cost.user_llm_flops(model, mean_prompt(metrics["user_llm"]), window),
          "text_prompt": cost.text_prompt_flops(model.llm.cfg,
                                                mean_prompt(metrics["text_prompt"]))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  summary_lib.remove_stale(workdir)
  # 1. data: generated and prepared once; every stage reads the same prepared files.
  configs = stage_configs(config, workdir)
  data = prepared.load_splits(config.data, workdir)
  timings = {}
  summaries = {}
  for name in ("encoder", "user_llm", "text_baseline"):   # 2-4
    summaries[name] = _stage(name, configs[name], os.path.join(workdir, name))
    timings[f"{name}_sec"] = summaries[name].get("stage_sec",
                                                 summaries[name].get("wall_time_sec"))
  ullm_summary, text_summary = summaries["user_llm"], summaries["text_baseline"]
  # 5. Report.
  t_gen = time.perf_counter()
  trained = inference.load_trained(os.path.join(workdir, "user_llm"))
  example = (personalized_generation(trained, configs["user_llm"], data)
             if config.report_generation else None)
  timings["generation_sec"] = time.perf_counter() - t_gen
  labels = {"user_llm": f"User-LLM ({config.bridge.mode}, {config.strategy})",
            "user_llm_item_head": "User-LLM item head",
            "user_llm_shuffled": "User-LLM, shuffled users (control)",
            "user_llm_item_head_shuffled": "User-LLM item head, shuffled users (control)",
            "text_prompt": f"text prompt ({text_summary['strategy']})",
            "sasrec": "SASRec-style encoder", "popularity": "popularity",
            "majority": "majority genre", "rating_prior": "rating prior",
            "count_window": "exact count of the encoder's events (reference)",
            "count_prompt": "exact count of the text prompt's events (reference)",
            "probe": "linear probe of the encoder's states (reference)",
            "past_answer": "the user's own past reviews (reference)"}
  raw = dict(ullm_summary["metrics"])
  raw["text_prompt"] = text_summary["metrics"]["text_prompt"]
  if "count_prompt" in text_summary["metrics"]:
    raw["count_prompt"] = text_summary["metrics"]["count_prompt"]
  flops = _flops_per_answer(trained[0], config.data.window, raw)
  order = ["user_llm", "user_llm_item_head", "user_llm_shuffled",
           "user_llm_item_head_shuffled", "text_prompt", "sasrec", "popularity", "majority",
           "rating_prior", "count_window", "count_prompt", "probe", "past_answer"]
  metrics = {labels[k]: raw[k] for k in order if k in raw}
  by_label = {labels[k]: k for k in order}

  def flops_cell(name: str) -> str:
    key = by_label[name]
    value = flops.get("user_llm" if key.startswith("user_llm") else key)
    return f"{value / 1e9:.1f}" if value is not None else "-"

  def seconds_cell(name: str) -> str:
    by_task = metrics[name]
    secs = [m["sec_per_answer"] for m in by_task.values() if "sec_per_answer" in m]
    return f"{np.mean(secs):.2f}" if secs else "-"

  table = runner.results_table(metrics, tuple(config.eval.ks),
                               extra={"GFLOPs/answer": flops_cell, "s/answer": seconds_cell})
  verdicts = paired.verdicts(raw)
  wall = time.perf_counter() - t0
  procedures = "\n".join(f"  {name} ({task}): {m['procedure']}"
                         for name, by_task in metrics.items() for task, m in by_task.items()
                         if "procedure" in m)
  lines = [
      f"{config.name}: LLM={config.llm.source}, {ullm_summary['steps']} User-LLM steps x batch "
      f"{config.train.batch_size}, User-LLM {ullm_summary['trainable_params']:,} trainable / "
      f"{ullm_summary['total_params']:,} params; text prompt "
      f"{text_summary['trainable_params']:,} trainable, mean prompt "
      f"{text_summary['mean_prompt_tokens']:.0f} tokens; wall {wall:.0f} s (this process)",
      "metric +- standard error; n = test users the figure rests on; GFLOPs/answer: "
      "estimated forward FLOPs of reading the user and the prompt (eval/cost.py); s/answer: "
      "measured evaluation seconds per answer on this machine (a method's first evaluation "
      "includes its compilation)", table,
      "verdicts (a difference under two standard errors is a tie):"]
  lines += [f"  {v}" for v in verdicts]
  lines += ["procedures:", procedures]
  if example is not None:
    lines.append(f"personalized generation for user {example['user']} "
                 f"({example['history_events']} events read; most recent last):")
    lines += [f"  {e}" for e in example["recent"]]
    for task, a in example["answers"].items():
      lines.append(f"  Q: {a['question']}\n  A (User-LLM): {a['model']}   [truth: {a['truth']}]")
  text_out = "\n".join(lines)
  summary = {"config_name": config.name, "job": config.job, "metrics": metrics,
             "metrics_by_key": raw, "verdicts": verdicts, "flops_per_answer": flops,
             "stages": {"encoder": summaries["encoder"].get("metrics"),
                        "user_llm": {k: ullm_summary.get(k) for k in (
                            "trainable_params", "total_params", "steps", "budget",
                            "param_groups", "history")},
                        "text_baseline": {k: text_summary.get(k) for k in (
                            "strategy", "trainable_params", "total_params", "steps", "budget",
                            "mean_prompt_tokens")}},
             "generation": example, "timings": timings, "wall_time_sec": wall,
             "pipeline_sec_total": float(np.nansum([v or 0.0 for v in timings.values()]))}
  summary_lib.write_summary(workdir, summary, text_out)
  print(text_out, flush=True)
  return summary
