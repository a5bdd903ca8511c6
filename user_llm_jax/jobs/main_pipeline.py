"""The README's main job: the whole system end to end on the embedded synthetic data.

Stages (each in its own subdirectory of WORKDIR; a finished stage is skipped on rerun and
an interrupted one resumes from its checkpoint):

  1. data       generate the synthetic MovieLens-format dataset (WORKDIR/raw) and prepare
                it (WORKDIR/data)
  2. encoder    pretrain the user encoder (WORKDIR/encoder)
  3. user_llm   train User-LLM on the tasks with the pretrained encoder (WORKDIR/user_llm)
  4. text       the text-prompt baseline with the same LLM on the same test examples
                (WORKDIR/text_baseline)
  5. report     results table (User-LLM, text prompt, SASRec-style, popularity, majority
                genre) and one
                personalized generation, in WORKDIR/summary.json + summary.txt
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from user_llm_jax.jobs import generate as generate_lib
from user_llm_jax.jobs import pretrain_encoder
from user_llm_jax.jobs import text_baseline
from user_llm_jax.jobs import train_user_llm
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.train import summary as summary_lib


def _finished(stage_dir: str) -> dict[str, Any] | None:
  path = os.path.join(stage_dir, summary_lib.SUMMARY_JSON)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _stage(name: str, fn, config: ml_collections.ConfigDict, stage_dir: str) -> dict[str, Any]:
  done = _finished(stage_dir)
  if done is not None:
    print(f"[main] stage {name}: already finished in {stage_dir}, reusing", flush=True)
    return done
  print(f"[main] stage {name} -> {stage_dir}", flush=True)
  os.makedirs(stage_dir, exist_ok=True)
  t0 = time.perf_counter()
  out = fn(config, stage_dir)
  if out.get("preempted"):
    raise SystemExit(f"[main] stage {name} preempted at step {out['step']}; rerun to resume")
  out["stage_sec"] = time.perf_counter() - t0
  return out


def encoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The encoder pretraining config of the pipeline (encoder_movielens keys)."""
  c = ml_collections.ConfigDict()
  c.job, c.name, c.seed = "pretrain_encoder", f"{config.name}/encoder", config.seed
  c.data = ml_collections.ConfigDict(config.data.to_dict())
  c.model = ml_collections.ConfigDict(config.pretrain.model.to_dict())
  c.train = ml_collections.ConfigDict(config.pretrain.train.to_dict())
  c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  c.eval = ml_collections.ConfigDict({"batch_size": 256, "ks": tuple(config.eval.ks)})
  return c


def stage_config(config: ml_collections.ConfigDict, job: str,
                 **changes: Any) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  del c["pretrain"]
  c.job = job
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def user_llm_stage_config(config: ml_collections.ConfigDict,
                          workdir: str) -> ml_collections.ConfigDict:
  """The `train_user_llm` config of the pipeline's User-LLM stage."""
  return stage_config(
      config, "train_user_llm", **{
          "data.manual_dir": os.path.join(workdir, "raw"),
          "data.data_dir": os.path.join(workdir, "data"),
          "encoder.init": "pretrained", "encoder.workdir": os.path.join(workdir, "encoder")})


def personalized_generation(ullm_config: ml_collections.ConfigDict,
                            workdir: str) -> dict[str, Any]:
  """One test user's recent history and the trained User-LLM's answers to the tasks."""
  config = ullm_config
  model, tokenizer, data = generate_lib.load_trained(ullm_config, os.path.join(workdir,
                                                                               "user_llm"))
  transform = ex_lib.TaskExample(data.vocab, tokenizer, train_user_llm.example_config(
      ullm_config, vocab=data.vocab))
  index = train_user_llm.eval_indices(len(data.test), config.eval.num_examples, config.seed)[0]
  record = dict(data.test[index])
  events = transform.history_events(record)
  out = {"user": ex_lib.text_of(record["user_id"]), "history_events": len(events),
         "recent": events[-5:], "answers": {}}
  for task in transform.cfg.tasks:
    example = transform.map(dict(record, task=task))
    prompt = ex_lib.prompt_of(example)
    out["answers"][task] = {
        "question": prompts.question(transform.cfg.spec, task),
        # A few tokens of slack beyond the trained answer length: a free-form answer may
        # be a little longer than the reference.
        "model": generate_lib.answer(model, tokenizer, example, prompt,
                                     config.tasks.max_answer_tokens + 8),
        "truth": transform.answer_text(record, task)}
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  summary_lib.remove_stale(workdir)
  # 1. data: generated and prepared once; every stage reads the same prepared files.
  pretrain_encoder.prepare_data(config.data, workdir)
  data_keys = {"data.manual_dir": os.path.join(workdir, "raw"),
               "data.data_dir": os.path.join(workdir, "data")}
  enc = encoder_config(config)
  enc.data.manual_dir, enc.data.data_dir = data_keys["data.manual_dir"], data_keys["data.data_dir"]
  timings = {}
  # 2. encoder pretraining.
  enc_dir = os.path.join(workdir, "encoder")
  enc_summary = _stage("encoder", pretrain_encoder.run, enc, enc_dir)
  timings["encoder_sec"] = enc_summary.get("stage_sec", enc_summary.get("wall_time_sec"))
  # 3. User-LLM.
  ullm = user_llm_stage_config(config, workdir)
  ullm_summary = _stage("user_llm", train_user_llm.run, ullm, os.path.join(workdir, "user_llm"))
  timings["user_llm_sec"] = ullm_summary.get("stage_sec", ullm_summary.get("wall_time_sec"))
  # 4. Text-prompt baseline on the same test examples.
  text = stage_config(config, "text_baseline", **data_keys)
  text_summary = _stage("text_baseline", text_baseline.run, text,
                        os.path.join(workdir, "text_baseline"))
  timings["text_baseline_sec"] = text_summary.get("stage_sec",
                                                  text_summary.get("wall_time_sec"))
  # 5. Report.
  t_gen = time.perf_counter()
  example = personalized_generation(ullm, workdir) if config.report_generation else None
  timings["generation_sec"] = time.perf_counter() - t_gen
  metrics = {
      f"User-LLM ({config.bridge.mode}, {config.strategy})": ullm_summary["metrics"]["user_llm"],
      f"text prompt ({text_summary['strategy']})": text_summary["metrics"]["text_prompt"],
  }
  for name, label in (("sasrec", "SASRec-style encoder"), ("popularity", "popularity"),
                      ("majority", "majority genre")):
    if name in ullm_summary["metrics"]:
      metrics[label] = ullm_summary["metrics"][name]
  wall = time.perf_counter() - t0
  table = train_user_llm.results_table(metrics, tuple(config.eval.ks))
  procedures = "\n".join(f"  {task}: {m['procedure']}"
                         for task, m in ullm_summary["metrics"]["user_llm"].items())
  lines = [
      f"{config.name}: LLM={config.llm.source}, {ullm_summary['steps']} User-LLM steps x batch "
      f"{config.train.batch_size}, User-LLM {ullm_summary['trainable_params']:,} trainable / "
      f"{ullm_summary['total_params']:,} params; text prompt "
      f"{text_summary['trainable_params']:,} trainable, mean prompt "
      f"{text_summary['mean_prompt_tokens']:.0f} tokens; test examples per task: "
      f"{config.eval.num_examples}; wall {wall:.0f} s (this process)", table,
      "procedures:", procedures]
  if example is not None:
    lines.append(f"personalized generation for user {example['user']} "
                 f"({example['history_events']} events read; most recent last):")
    lines += [f"  {e}" for e in example["recent"]]
    for task, a in example["answers"].items():
      lines.append(f"  Q: {a['question']}\n  A (User-LLM): {a['model']}   [truth: {a['truth']}]")
  text_out = "\n".join(lines)
  summary = {"config_name": config.name, "job": config.job, "metrics": metrics,
             "stages": {"encoder": enc_summary.get("metrics"),
                        "user_llm": {k: ullm_summary.get(k) for k in (
                            "trainable_params", "total_params", "steps", "budget",
                            "param_groups")},
                        "text_baseline": {k: text_summary.get(k) for k in (
                            "strategy", "trainable_params", "total_params", "steps", "budget",
                            "mean_prompt_tokens")}},
             "generation": example, "timings": timings, "wall_time_sec": wall,
             "pipeline_sec_total": float(np.nansum([v or 0.0 for v in timings.values()]))}
  summary_lib.write_summary(workdir, summary, text_out)
  print(text_out, flush=True)
  return summary
