"""User-LLM training job: data -> encoder (pretrained or random) + LLM + bridge -> train -> eval.

For any (mode, use_perceiver, strategy, encoder init) of the config it trains User-LLM on
the configured tasks with the generic trainer (the strategy is the optimizer's `wrt`
filter), then evaluates on a fixed, seeded sample of test records. With `align.steps > 0`
an alignment stage comes first (`tasks/alignment.py`: the LLM frozen, only the modules of
`align.trainable` train, on writing out each user's most recent titles); its checkpoints
are in `WORKDIR/align/checkpoints`, its loss curve in the summary (`align`) and at
steps <= 0 of `loss.png`.

  user_llm            the tasks' metrics (procedures in `tasks/evaluate.py`)
  user_llm_item_head  next item by the item head, full-catalogue ranking (bridge.item_head)
  user_llm_copy_off   with `bridge.copy_head`: the same model with the copy gate shut
  user_llm_shuffled   the same model with each test user's context swapped for another
                      user's: the control that shows whether the user context is used
  sasrec, popularity, majority, rating_prior
                      the non-LLM baselines on the same records (`eval/floors.py`)
  count_window, probe, past_answer
                      references from above on the same records (`eval/floors.py`)

The run's description (resolved config, architectures, vocabulary, tokenizer) goes to
`WORKDIR/run.json` and beside it, so `--mode=generate` runs from this workdir alone; results
to `WORKDIR/summary.json` / `summary.txt`. Rerunning with the same workdir resumes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import params as params_lib
from user_llm_jax import runs
from user_llm_jax.bridge import category_text
from user_llm_jax.bridge import copy_head
from user_llm_jax.bridge import strategies
from user_llm_jax.bridge.user_llm import UserLLM
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.eval import floors
from user_llm_jax.eval import paired
from user_llm_jax.eval import probe
from user_llm_jax.eval import retrieval
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import alignment
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import checkpointing
from user_llm_jax.train import setup
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib

JOB = "train_user_llm"
ALIGN_DIR = "align"  # the alignment stage's checkpoints and TensorBoard files, in WORKDIR
ENCODER_HINT = ("python -m experiments.main --config=experiments/configs/encoder_movielens.py "
                "--workdir=DIR (same data keys), then --config.encoder.workdir=DIR")


def user_encoder(config: ml_collections.ConfigDict, data: runner.TaskData,
                 ) -> tuple[UserEncoder, UserEncoder | None]:
  """The encoder User-LLM starts from, and a copy of it when pretrained (else None).

  `encoder.init=pretrained`: the architecture and weights of the pretraining run in
  `encoder.workdir` (its `run.json` and checkpoint). `random`: fresh weights (from
  `seed`) in the architecture of the pretraining run in `encoder.workdir` when one is
  named, so that the random-encoder ablation differs from its pretrained run in the
  weights alone; else in the architecture `encoder.model` gives.
  """
  init = config.encoder.init
  if init not in ("pretrained", "random"):
    raise config_lib.ConfigError(
        f"config key 'encoder.init' is {init!r}; expected 'pretrained' or 'random'")
  if init == "random" and not config.encoder.workdir:
    cfg = models.encoder_config_from(config.encoder.model, data.vocab,
                                     window=config.data.window,
                                     max_categories=config.data.max_categories)
    return models.build_encoder(cfg, config.seed), None
  if not config.encoder.workdir:
    raise config_lib.ConfigError("config key 'encoder.workdir' is empty; with "
                                 f"encoder.init=pretrained it names the pretraining run ({ENCODER_HINT})")
  run = runs.load_run(config.encoder.workdir, job=("pretrain_encoder",),
                      what="pretrained user encoder", make=ENCODER_HINT,
                      checkpoint=init == "pretrained")
  cfg = models.encoder_config_from_architecture(run.architecture)
  vocab = data.vocab
  if (cfg.num_items, cfg.num_categories) != (vocab.num_items, vocab.num_categories):
    raise config_lib.ConfigError(
        f"the pretrained encoder in {config.encoder.workdir!r} was trained on "
        f"{cfg.num_items} items / {cfg.num_categories} categories, but the dataset has "
        f"{vocab.num_items} / {vocab.num_categories}: pretrain on the same prepared data "
        f"(and the same data.text_categories, here {config.data.get('text_categories', 0)})")
  if cfg.max_len < config.data.window:
    raise config_lib.ConfigError(f"data.window={config.data.window} exceeds the pretrained "
                                 f"encoder's max_len {cfg.max_len}")
  encoder = models.build_encoder(cfg, config.seed)
  if init == "random":
    return encoder, None
  checkpointing.restore_params(encoder, run.checkpoints)
  return encoder, nnx.clone(encoder)


# Training records whose encoder states set the bridge's standardisation (a seeded sample).
STATE_STATISTICS_RECORDS = 256


def standardize_states(model: UserLLM, data: runner.TaskData,
                       config: ml_collections.ConfigDict) -> None:
  """Starts the bridge's state shift / gain at the encoder states' mean / 1 / spread over
  the events of a seeded sample of training records (`bridge.standardize_states`)."""
  sample = runner.eval_indices(len(data.train), STATE_STATISTICS_RECORDS, config.seed)
  mean, std = probe.state_statistics(model.encoder, [data.train[i] for i in sample],
                                     config.data)
  model.init_state_standardization(mean, std)


def build(config: ml_collections.ConfigDict, data: runner.TaskData,
          ) -> tuple[UserLLM, Tokenizer, UserEncoder | None, dict[str, Any]]:
  """(User-LLM, tokenizer, pretrained encoder copy or None, architecture record)."""
  strategy = models.check_strategy_name(config.strategy)
  encoder, pretrained = user_encoder(config, data)
  llm, tokenizer = models.load_llm(config.llm, config.seed)
  lora = models.lora_config(config) if strategy == "lora" else None
  bridge = models.bridge_config(config)
  tokens = (category_text.token_table(data.vocab.categories, tokenizer,
                                      bridge.category_text_tokens)
            if bridge.category_text else None)
  copy = {}
  if bridge.copy_head:
    copy = dict(lowercase_tokens=copy_head.lowercase_table(tokenizer, llm.cfg.vocab_size),
                copy_start_token=prompts.chat_prompt(tokenizer, "?")[-1])
  model = models.assemble_user_llm(bridge, encoder, llm, strategy=strategy, lora=lora,
                                   seed=config.seed, category_tokens=tokens, **copy)
  if bridge.standardize_states:
    standardize_states(model, data, config)
  arch = models.architecture(encoder=encoder.cfg, llm=llm.cfg, bridge=bridge, lora=lora,
                             strategy=strategy)
  return model, tokenizer, pretrained, arch


def param_checksum(model: nnx.Module, wrt: Any = nnx.Param) -> float:
  """Sum of |w| over the selected parameters (float64): a cheap identity check of weights."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(nnx.state(model, wrt))))


def task_losses(history: list[dict[str, float]]) -> list[dict[str, float]]:
  """History rows with `loss/<task>` = summed token loss / token count of that task."""
  out = []
  for row in history:
    row = dict(row)
    for task in prompts.TASKS:
      tokens = row.get(f"task_tokens/{task}")
      if tokens:
        row[f"loss/{task}"] = row[f"task_nll/{task}"] / tokens
    out.append(row)
  return out


def evaluate_user_llm(model: UserLLM, tokenizer: Tokenizer, data: runner.TaskData,
                      transform: ex_lib.TaskExample, config: ml_collections.ConfigDict,
                      ) -> dict[str, dict[str, dict[str, Any]]]:
  """{method: {task: metrics}} of the trained model, its item head and the shuffled control."""
  condition = eval_lib.user_llm_conditioner(model, tokenizer.pad_id)
  # Titles are decoded only when the model was trained to write them.
  tasks = [t for t in transform.cfg.tasks
           if t != prompts.NEXT_ITEM or transform.cfg.next_item_titles]
  out = {"user_llm": runner.evaluate_tasks(condition, data, transform, config, tasks=tasks)}
  if model.item_head is not None and prompts.NEXT_ITEM in transform.cfg.tasks:
    out["user_llm_item_head"] = {prompts.NEXT_ITEM: item_head_metrics(
        model, data, transform, config)}
    if model.cfg.item_head_skip:
      # The skip alone: the trained encoder's own head without the LLM's part. Against the
      # pretrained encoder's head (`sasrec`) it tells whether training moved the encoder's
      # ranking; against the item head, what the LLM's part adds.
      # With the frozen skip (`bridge.item_head_skip_frozen`) the skip is the pretrained
      # head itself, and this row shows how far training moved the encoder's own.
      head = floors.encoder_next_item(model.encoder, data, config)
      what = ("not the item head's skip, which reads the frozen pretrained copy"
              if model.skip_encoder is not None
              else "the item head's skip without the LLM's part")
      head["procedure"] = f"the trained encoder's own head ({what}), " + head["procedure"]
      out["user_llm_encoder_head"] = {prompts.NEXT_ITEM: head}
  if config.eval.shuffled_control:
    out["user_llm_shuffled"] = runner.evaluate_tasks(condition, data, transform, config,
                                                     shuffle_users=True, tasks=tasks)
    if "user_llm_item_head" in out:
      out["user_llm_item_head_shuffled"] = {prompts.NEXT_ITEM: item_head_metrics(
          model, data, transform, config, shuffle_users=True)}
    if model.llm.copy_head is not None:
      # The copy head's own control: the same trained model with its copy gate shut (the
      # LLM's distribution alone), so the difference is what the copies add.
      with copy_head.gate_shut(model.llm.copy_head):
        out["user_llm_copy_off"] = runner.evaluate_tasks(condition, data, transform, config,
                                                         tasks=tasks)
  return out


def item_head_metrics(model: UserLLM, data: runner.TaskData, transform: ex_lib.TaskExample,
                      config: ml_collections.ConfigDict, *,
                      shuffle_users: bool = False) -> dict[str, Any]:
  """Full-catalogue Recall@K / NDCG@10 of the item head on the seeded next-item examples."""
  indices = runner.eval_indices(len(data.test), config.eval.num_examples, config.seed)
  examples, _, ids = runner.build_eval_examples(data, transform, indices, prompts.NEXT_ITEM)
  if shuffle_users:
    examples = runner.shuffled_examples(examples)
  size = config.eval.batch_size
  batches = [ex_lib.collate(examples[i:i + size]) for i in range(0, len(examples), size)]
  metrics = retrieval.evaluate_next_item(model, batches, ks=tuple(config.eval.ks), ids=ids)
  return dict(floors.with_recall_stderr(metrics),
              procedure="item head on the LLM state at the prompt's last token, "
                        + floors.ranking_procedure(data.vocab))


def curve_fn(model: UserLLM, tokenizer: Tokenizer, data: runner.TaskData,
             transform: ex_lib.TaskExample, config: ml_collections.ConfigDict):
  """`model -> metrics` for the learning curve (every `train.eval_every` steps), or None.

  Cheap task metrics on `eval.curve_examples` test users: favorite-category accuracy
  (exact scoring of the label set) and the item head's Recall@10.
  """
  if not runner.wants_curve(config):
    return None

  def evaluate(m: UserLLM) -> dict[str, float]:
    out = runner.curve_metrics(eval_lib.user_llm_conditioner(m, tokenizer.pad_id), data,
                               transform, config)
    if m.item_head is not None and prompts.NEXT_ITEM in transform.cfg.tasks:
      small = ml_collections.ConfigDict(config.to_dict())
      small.eval.num_examples = config.eval.curve_examples
      out["item_head_recall@10"] = item_head_metrics(m, data, transform, small)["recall@10"]
    return out

  del model
  return evaluate


def align_config(config: ml_collections.ConfigDict) -> alignment.AlignConfig:
  """The `align` section (absent, as in runs saved before it existed: no alignment)."""
  section = config.get("align")
  if section is None:
    return alignment.AlignConfig()
  return config_lib.to_dataclass(alignment.AlignConfig, section, "align")


def align_stage(model: UserLLM, tokenizer: Tokenizer, data: runner.TaskData,
                transform: ex_lib.TaskExample, config: ml_collections.ConfigDict,
                align_cfg: alignment.AlignConfig, train_cfg: trainer_lib.TrainConfig, *,
                mesh: Any, rules: Any, workdir: str, fingerprint: dict[str, Any],
                description: dict[str, Any]) -> dict[str, Any]:
  """Trains the modules of `align.trainable` on writing out the users' recent events
  (their titles or their categories' words: `align.content`).

  Resumes from `WORKDIR/align/checkpoints` like any training; once the task stage has a
  checkpoint (which holds the aligned model), only the stage's record is read back.

  Returns:
    The stage's summary (`steps`, `history`, `trainable_params`, ...), or
    `{"preempted": True, ...}` when a SIGTERM stopped it.

  Raises:
    ConfigError: `align.trainable` selects no parameter of this model.
  """
  wrt = strategies.module_filter(align_cfg.trainable)
  trainable = params_lib.count_params(model, wrt)
  if not trainable:
    raise config_lib.ConfigError(
        f"config key 'align.trainable'={align_cfg.trainable} selects no parameter of this "
        f"User-LLM (bridge.mode={config.bridge.mode!r}, "
        f"use_perceiver={bool(config.bridge.use_perceiver)})")
  stage_dir = os.path.join(workdir, ALIGN_DIR)
  # The task stage's optimizer keys (weight decay, clipping, lr_mults: the gates need theirs
  # here too) on the stage's own schedule.
  cfg = dataclasses.replace(train_cfg, num_steps=align_cfg.steps, warmup=align_cfg.warmup,
                            learning_rate=align_cfg.learning_rate, eval_every=0)
  record = {"steps": align_cfg.steps, "events": align_cfg.events, "content": align_cfg.content,
            "trainable": list(align_cfg.trainable), "trainable_params": trainable,
            "learning_rate": align_cfg.learning_rate, "checkpoints": stage_dir}
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  done = checkpointing.latest_step(ckpt_dir)
  if done == align_cfg.steps and checkpointing.latest_step(
      os.path.join(workdir, "checkpoints")) is not None:
    ckpt = checkpointing.Checkpointer(ckpt_dir, every=cfg.checkpoint_every,
                                      fingerprint=fingerprint)
    try:
      extra = ckpt.read_meta(done).get("extra", {})
    finally:
      ckpt.close()
    return dict(record, history=align_history(extra.get("history", [])), resumed_from=done,
                train_sec=0.0)
  t0 = time.perf_counter()
  examples = alignment.AlignExample(data.vocab, tokenizer, transform.cfg, align_cfg)
  result = trainer_lib.train(
      model, lambda m, b: m.loss(b, deterministic=False), cfg,
      alignment.train_iterator(data.train, examples, batch_size=cfg.batch_size,
                               seed=config.seed, worker_count=config.data.worker_count),
      mesh=mesh, rules=rules, seed=config.seed, wrt=wrt, workdir=stage_dir,
      fingerprint=fingerprint, description=description,
      count_fn=lambda b: int(np.asarray(b[ex_lib.LOSS_MASK]).sum()),
      grad_groups=align_gradient_groups(model, align_cfg.trainable),
      desc=f"align {'+'.join(align_cfg.trainable)}")
  if result.preempted:
    return {"preempted": True, "step": result.step, "stage": "align"}
  return dict(record, history=align_history(result.history),
              resumed_from=result.resumed_from, train_sec=time.perf_counter() - t0)


def align_gradient_groups(model: UserLLM, trainable: tuple[str, ...]) -> dict[str, Any]:
  """The logged gradient-norm groups (`strategies.gradient_groups`) the stage trains."""
  named = set(trainable) | ({"projection"} if "perceiver" in trainable else set())
  return {k: f for k, f in strategies.gradient_groups(model).items() if k in named}


def align_history(history: list[dict[str, float]]) -> list[dict[str, float]]:
  """Logged rows without the task-only metrics (per-task sums, item head: all 0 here)."""
  return [{k: v for k, v in row.items() if not k.startswith(("task_", "item_"))}
          for row in history]


def align_text(record: dict[str, Any]) -> str:
  """One line on the alignment stage for the printed summary."""
  history = record["history"]
  first, last = (history[0], history[-1]) if history else ({}, {})
  # Records written before `align.content` existed wrote titles.
  content = ("titles" if record.get("content", "titles") == "titles"
             else "events' categories")
  return (f"alignment: {record['steps']} steps writing the last {record['events']} {content}, "
          f"training {'+'.join(record['trainable'])} ({record['trainable_params']:,} params); "
          f"loss {first.get('loss', float('nan')):.3f} -> {last.get('loss', float('nan')):.3f},"
          f" token accuracy {last.get('token_accuracy', float('nan')):.3f}")


def plot_rows(history: list[dict[str, float]],
              align_history: list[dict[str, float]]) -> list[dict[str, float]]:
  """The rows of `loss.png`: the alignment stage at steps <= 0 (`loss/align`), then the tasks."""
  shift = align_history[-1]["step"] if align_history else 0
  return [{"step": h["step"] - shift, "loss": h["loss"], "loss/align": h["loss"]}
          for h in align_history] + history


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates User-LLM; returns the summary dict (or a preemption note)."""
  t0 = time.perf_counter()
  train_cfg, mesh, rules = setup.start(config, workdir)
  data = runner.load(config, workdir)
  model, tokenizer, pretrained, arch = build(config, data)
  strategy = arch["strategy"]
  transform = ex_lib.TaskExample(data.vocab, tokenizer,
                                 runner.example_config(config, vocab=data.vocab))
  description = runs.save_run(workdir, JOB, config, arch, vocab=data.vocab, tokenizer=tokenizer)
  baselines = floors.non_llm_baselines(pretrained, data, config, transform)
  del pretrained
  fingerprint = config_lib.fingerprint(config, architecture=arch)
  align_cfg = align_config(config)
  align = None
  if align_cfg.enabled:
    align = align_stage(model, tokenizer, data, transform, config, align_cfg, train_cfg,
                        mesh=mesh, rules=rules, workdir=workdir, fingerprint=fingerprint,
                        description=description)
    if align.get("preempted"):
      return align
  wrt = strategies.trainable_filter(strategy)
  result = trainer_lib.train(
      model, lambda m, b: m.loss(b, deterministic=False), train_cfg,
      runner.train_iterator(data, transform, config, train_cfg.batch_size), mesh=mesh,
      rules=rules, seed=config.seed, wrt=wrt, workdir=workdir,
      eval_fn=curve_fn(model, tokenizer, data, transform, config),
      fingerprint=fingerprint, description=description,
      count_fn=lambda b: int(np.asarray(b[ex_lib.LOSS_MASK]).sum()),
      grad_groups=strategies.gradient_groups(model),
      desc=f"user-llm {config.bridge.mode}/{strategy}")
  if result.preempted:
    return {"preempted": True, "step": result.step}
  train_time = time.perf_counter() - t0
  t_eval = time.perf_counter()
  metrics = evaluate_user_llm(result.model, tokenizer, data, transform, config)
  eval_time = time.perf_counter() - t_eval
  metrics.update(baselines)
  history = task_losses(result.history)
  wall = time.perf_counter() - t0
  summary = {
      "config_name": config.name, "job": config.job, "metrics": metrics,
      "strategy": strategy, "mode": config.bridge.mode,
      "use_perceiver": bool(config.bridge.use_perceiver), "encoder_init": config.encoder.init,
      "llm": config.llm.source, "trainable_params": result.trainable_params,
      "total_params": result.total_params,
      "param_groups": strategies.param_groups(result.model),
      "trainable_checksum": param_checksum(result.model, wrt),
      "steps": result.step, "resumed_from": result.resumed_from,
      "budget": {"steps": result.step, "batch_size": train_cfg.batch_size,
                 "examples_seen": result.step * train_cfg.batch_size,
                 "train_sec": train_time, "eval_sec": eval_time,
                 "align_steps": align["steps"] if align else 0,
                 "align_sec": align["train_sec"] if align else 0.0},
      "wall_time_sec": wall, "history": history, "curve": result.evals, "align": align,
      "dataset": {"path": data.path, "protocol": config.data.protocol,
                  "window": config.data.window, "num_items": data.vocab.num_items,
                  "test_records": len(data.test), "train_records": len(data.train)},
  }
  # The run's own rows (floors, shuffled control) on the same users: paired verdicts.
  summary["verdicts"] = paired.verdicts(metrics)
  table = runner.results_table(metrics, tuple(config.eval.ks))
  procedures = "\n".join(f"  {name} ({task}): {m['procedure']}"
                         for name, by_task in metrics.items() for task, m in by_task.items()
                         if "procedure" in m)
  text = (f"{config.name}: User-LLM ({config.bridge.mode}, perceiver="
          f"{bool(config.bridge.use_perceiver)}, strategy={strategy}, encoder="
          f"{config.encoder.init}), {result.step} steps x batch {train_cfg.batch_size}, "
          f"{result.trainable_params:,} trainable / {result.total_params:,} params, "
          f"{wall:.1f} s wall\n{table}\nprocedures:\n{procedures}")
  if summary["verdicts"]:
    text += "\nverdicts (a difference under two standard errors is a tie):\n" + "\n".join(
        f"  {v}" for v in summary["verdicts"])
  # Each row by group of test users where a row names groups (reviews: where the answer
  # lies, `floors.review_groups`).
  summary["groups"] = paired.group_breakdown(metrics)
  if summary["groups"]:
    text += "\n" + paired.breakdown_text(summary["groups"])
  # The same for the metrics beside the headline that some row has per user (reviews with
  # `eval.review_likelihood`: where the context raises the reference answer).
  summary["groups_by_metric"] = {}
  for key in paired.further_keys():
    breakdown = paired.group_breakdown(metrics, key)
    if breakdown:
      summary["groups_by_metric"][key] = breakdown
      text += "\n" + paired.breakdown_text(breakdown, key)
  if align is not None:
    text = f"{text}\n{align_text(align)}"
  if history:
    align_rows = align["history"] if align else []
    title = f"{config.name} (alignment at steps <= 0)" if align_rows else config.name
    summary_lib.plot_loss(plot_rows(history, align_rows), summary_lib.loss_png(workdir),
                          title=title,
                          series=["loss/align"] + [f"loss/{t}" for t in prompts.TASKS])
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary
