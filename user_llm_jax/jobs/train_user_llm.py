"""User-LLM training job: data -> encoder (pretrained or random) + LLM + bridge -> train -> eval.

For any (mode, use_perceiver, strategy, encoder init) of the config it trains User-LLM on
the configured tasks with the generic trainer (the strategy is the optimizer's `wrt`
filter), then evaluates on a fixed, seeded sample of test records:

  User-LLM            next item Recall@1/5/10, favorite-category accuracy, review ROUGE-Lsum
                      (procedures in `tasks/evaluate.py`, repeated in the summary)
  SASRec-style        the pretrained encoder's own next-item head, full-catalogue ranking
                      (`eval/retrieval.py`) on the same records, before User-LLM training
  popularity          training-split item counts, full-catalogue ranking, same records

Results go to `WORKDIR/summary.json` and `WORKDIR/summary.txt` with the trainable and total
parameter counts. Rerunning with the same workdir resumes training from its checkpoint.
The helpers here (data, LLM loading, example building, evaluation) are shared with the
text-prompt baseline and the main pipeline.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.bridge import strategies
from user_llm_jax.bridge.user_llm import UserLLM, UserLlmConfig
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import schema
from user_llm_jax.data import source as source_lib
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.encoder import config as encoder_config
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.eval import popularity
from user_llm_jax.eval import retrieval
from user_llm_jax.jobs import pretrain_encoder
from user_llm_jax.llm import lora as lora_lib
from user_llm_jax.llm import loading
from user_llm_jax.llm.config import get_preset
from user_llm_jax.llm.model import Decoder
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.train import checkpointing
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib


@dataclasses.dataclass
class TaskData:
  """A prepared dataset opened for the task jobs."""

  path: str
  train: Any
  test: Any
  vocab: schema.Vocabulary
  statistics: dict


def load_task_data(config: ml_collections.ConfigDict, workdir: str) -> TaskData:
  """Prepares (or reuses) the configured dataset and opens its train and test splits."""
  path = pretrain_encoder.prepare_data(config.data, workdir)
  train, vocab, stats = source_lib.load_prepared(path, "train")
  test, _, _ = source_lib.load_prepared(path, "test")
  if len(train) == 0 or len(test) == 0:
    raise ValueError(f"prepared dataset {path!r} has an empty split "
                     f"(train={len(train)}, test={len(test)} records)")
  return TaskData(path, train, test, vocab, stats)


def load_llm(llm: ml_collections.ConfigDict, seed: int) -> tuple[Decoder, Tokenizer]:
  """The configured decoder and tokenizer ('random' pairs a tiny LLM with byte tokens)."""
  with nnx.use_eager_sharding(False):
    if llm.source == "random":
      tokenizer = prompts.byte_level_tokenizer()
      cfg = get_preset(llm.preset, vocab_size=tokenizer.vocab_size, dtype=llm.dtype)
      model = loading.load_llm("random", cfg, seed=seed).model
      return model, tokenizer
    loaded = loading.load_llm(llm.source, dtype=llm.dtype,
                              cache_dir=os.path.expanduser(llm.cache_dir) or None)
  if loaded.tokenizer is None:
    raise FileNotFoundError(f"config key 'llm.source'={llm.source!r} has no tokenizer "
                            "(tokenizer.json) next to the weights")
  return loaded.model, loaded.tokenizer


def example_config(config: ml_collections.ConfigDict, *, history_tokens: int = 0,
                   vocab: schema.Vocabulary | None = None) -> ex_lib.ExampleConfig:
  t = config.tasks
  return ex_lib.ExampleConfig(
      tasks=tuple(t.names), window=config.data.window,
      max_categories=config.data.max_categories,
      max_prompt_tokens=t.max_prompt_tokens + history_tokens,
      max_answer_tokens=t.max_answer_tokens, history_tokens=history_tokens,
      review_field=t.review_field,
      dataset=vocab.dataset if vocab is not None else config.data.dataset)


def eval_indices(num_records: int, num: int, seed: int) -> list[int]:
  """A seeded sample of `num` test records (all when fewer), in index order."""
  if num <= 0 or num >= num_records:
    return list(range(num_records))
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(num_records, size=num, replace=False))


def build_eval_examples(data: TaskData, transform: ex_lib.TaskExample, indices: Sequence[int],
                        task: str) -> tuple[list[dict], list[str]]:
  """Task examples of the test records `indices` and their reference answers."""
  out, refs = [], []
  for i in indices:
    record = dict(data.test[i])
    record[ex_lib.TASK] = task
    answer = transform.answer_text(record, task)
    if task == prompts.REVIEW and answer is None:
      continue  # no review text to compare against
    out.append(transform.map(record))
    refs.append(answer or "")
  return out, refs


def evaluate_tasks(condition: eval_lib.Conditioner, data: TaskData,
                   transform: ex_lib.TaskExample, config: ml_collections.ConfigDict,
                   ) -> dict[str, dict[str, Any]]:
  """Every configured task's metrics for one conditioned LLM, on the seeded test sample."""
  indices = eval_indices(len(data.test), config.eval.num_examples, config.seed)
  results: dict[str, dict[str, Any]] = {}
  for task in transform.cfg.tasks:
    examples, refs = build_eval_examples(data, transform, indices, task)
    if task == prompts.NEXT_ITEM:
      catalogue = eval_lib.Catalogue(data.vocab, transform.tokenizer,
                                     max_tokens=transform.cfg.max_answer_tokens)
      results[task] = eval_lib.evaluate_next_item(
          condition, examples, catalogue, ks=tuple(config.eval.ks),
          exact_threshold=config.eval.exact_threshold, batch_size=config.eval.batch_size)
    elif task == prompts.FAVORITE_CATEGORY:
      results[task] = eval_lib.evaluate_category(
          condition, examples, data.vocab, transform.tokenizer,
          batch_size=config.eval.batch_size)
    else:
      results[task] = eval_lib.evaluate_review(
          condition, examples, refs, transform.tokenizer,
          max_new_tokens=config.tasks.max_answer_tokens + 1, batch_size=config.eval.batch_size)
  return results


def encoder_baselines(encoder: UserEncoder | None, data: TaskData,
                      config: ml_collections.ConfigDict,
                      transform: ex_lib.TaskExample | None = None,
                      ) -> dict[str, dict[str, dict[str, Any]]]:
  """Non-LLM baselines on the same test records: {method: {task: metrics}}.

  Next item: SASRec-style (the encoder's next-item head) and popularity. Favorite category:
  the majority label of the training records. Review (needs `transform`): the most frequent
  training answer for the review's rating. The last two are the floors a personalized answer
  must beat.
  """
  names = tuple(config.tasks.names)
  indices = eval_indices(len(data.test), config.eval.num_examples, config.seed)
  records = [data.test[i] for i in indices]
  out: dict[str, dict[str, dict[str, Any]]] = {}
  if prompts.NEXT_ITEM in names:
    crop = [transforms_lib.CropAndPad(config.data.window, config.data.max_categories)]
    batches = lambda: pipeline_lib.make_eval_pipeline(records, batch_size=64, transforms=crop)
    ks = tuple(config.eval.ks)
    procedure = f"full-catalogue ranking of {data.vocab.num_items - 2} items, ties by item id"
    if encoder is not None:
      out["sasrec"] = {prompts.NEXT_ITEM: dict(
          retrieval.evaluate_next_item(encoder, batches(), ks=ks), procedure=procedure)}
    counts = popularity.fit_item_counts(data.train, data.vocab.num_items)
    out["popularity"] = {prompts.NEXT_ITEM: dict(
        popularity.evaluate_popularity(counts, batches(), ks=ks), procedure=procedure)}
  if prompts.FAVORITE_CATEGORY in names:
    out["majority"] = {prompts.FAVORITE_CATEGORY: majority_category(data.train, records,
                                                                     data.vocab)}
  if prompts.REVIEW in names and transform is not None:
    out["rating_prior"] = {prompts.REVIEW: rating_prior_review(data, transform, indices)}
  return out


def rating_prior_review(data: TaskData, transform: ex_lib.TaskExample,
                        indices: Sequence[int]) -> dict[str, Any]:
  """ROUGE-Lsum of answering each test review with the commonest training answer of its rating.

  The review prompt states the rating, so "Five Stars" for a 5 is learnable without any
  user context; this is the score a model reaches from the rating alone.
  """
  by_rating: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in data.train:
    answer = transform.answer_text(dict(record), prompts.REVIEW)
    if answer is not None:
      by_rating[int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])][answer] += 1
  if not by_rating:
    raise ValueError("no training record has a review answer")
  overall = sum(by_rating.values(), collections.Counter())
  commonest = lambda counts: min(counts, key=lambda a: (-counts[a], a))  # ties: alphabetical
  predictions, references = [], []
  for i in indices:
    record = dict(data.test[i])
    answer = transform.answer_text(record, prompts.REVIEW)
    if answer is None:
      continue  # the same records the LLMs are scored on
    rating = int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])
    predictions.append(commonest(by_rating.get(rating, overall)))
    references.append(answer)
  return {"rougeLsum": eval_lib.rouge_lsum(predictions, references),
          "num_examples": len(references),
          "answers": {str(data.vocab.ratings[r]) if r < data.vocab.num_ratings else str(r):
                      commonest(c) for r, c in sorted(by_rating.items())},
          "procedure": "the most frequent training answer for the review's rating"}


def majority_category(train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
                      vocab: schema.Vocabulary) -> dict[str, Any]:
  """Accuracy of always answering the most frequent training favorite category."""
  labels = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in train], np.int64)
  labels = labels[labels >= schema.FIRST_ID]
  if not labels.size:
    raise ValueError("no training record has a favorite category label")
  counts = np.bincount(labels, minlength=vocab.num_categories)
  best = int(np.argmax(counts))  # ties: the smallest id
  truth = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in test], np.int64)
  return {"accuracy": float(np.mean(truth == best)) if truth.size else float("nan"),
          "num_examples": int(truth.size), "answer": vocab.categories[best],
          "procedure": f"always the training majority label {vocab.categories[best]!r}"}


def _match_keys(target: Any, raw: Any, path: str) -> Any:
  """Re-keys an Orbax-restored dict (string keys) like `target` (an nnx pure dict)."""
  if not isinstance(target, Mapping):
    value = np.asarray(raw)
    if value.shape != np.shape(target):
      raise checkpointing.CheckpointError(
          f"checkpoint parameter {path} has shape {value.shape}, the model expects "
          f"{np.shape(target)}")
    return value
  if not isinstance(raw, Mapping):
    raise checkpointing.CheckpointError(f"checkpoint entry {path} is not a module")
  out = {}
  for key, sub in target.items():
    if str(key) not in raw:
      raise checkpointing.CheckpointError(
          f"checkpoint lacks {path}/{key} (has {sorted(raw)[:8]}); it was written by a "
          "different model")
    out[key] = _match_keys(sub, raw[str(key)], f"{path}/{key}")
  return out


def restore_module(module: nnx.Module, directory: str, *, step: int | None = None) -> int:
  """Loads the model part of a trainer checkpoint (`workdir/checkpoints`) into `module`.

  Returns:
    The restored step.

  Raises:
    CheckpointError: nothing to restore, or a structure/shape mismatch (naming the key).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(f"checkpoint directory {directory!r} does not exist")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {directory!r}")
  raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  state = nnx.state(module, nnx.Not(nnx.RngState))
  values = _match_keys(nnx.to_pure_dict(state), raw["state"]["0"], directory)
  nnx.replace_by_pure_dict(state, values)
  nnx.update(module, state)
  return int(step)


def encoder_config_of(config: ml_collections.ConfigDict,
                      data: TaskData) -> encoder_config.EncoderConfig:
  """The encoder architecture: the pretraining run's (pretrained init) or the config's."""
  vocab = data.vocab
  if config.encoder.init == "pretrained":
    path = os.path.join(os.path.expanduser(config.encoder.workdir), summary_lib.SUMMARY_JSON)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"config key 'encoder.workdir' must be a finished encoder pretraining workdir; "
          f"{path!r} does not exist (run pretrain_encoder first, or set encoder.init=random)")
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    fields = {k: (jnp.dtype(v).type if k.endswith("dtype") else v)
              for k, v in summary["encoder"].items()}
    enc = encoder_config.EncoderConfig(**fields)
    if (enc.num_items, enc.num_categories) != (vocab.num_items, vocab.num_categories):
      raise config_lib.ConfigError(
          f"the pretrained encoder in {config.encoder.workdir!r} was trained on "
          f"{enc.num_items} items / {enc.num_categories} categories, but the dataset has "
          f"{vocab.num_items} / {vocab.num_categories}: pretrain on the same prepared data")
    if enc.max_len < config.data.window:
      raise config_lib.ConfigError(f"data.window={config.data.window} exceeds the pretrained "
                                   f"encoder's max_len {enc.max_len}")
    return enc
  if config.encoder.init != "random":
    raise config_lib.ConfigError(
        f"config key 'encoder.init' is {config.encoder.init!r}; expected 'pretrained' or 'random'")
  return pretrain_encoder.encoder_config_from(
      config.encoder.model, num_items=vocab.num_items, num_ratings=vocab.num_ratings,
      num_categories=vocab.num_categories, window=config.data.window,
      max_categories=config.data.max_categories)


def bridge_config(config: ml_collections.ConfigDict) -> UserLlmConfig:
  return config_lib.to_dataclass(UserLlmConfig, config.bridge, "bridge")


def apply_strategy_lora(llm: Decoder, config: ml_collections.ConfigDict, strategy: str,
                        seed: int) -> None:
  if strategy == "lora":
    cfg = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                              targets=tuple(config.lora.targets))
    lora_lib.apply_lora(llm, cfg, rngs=nnx.Rngs(seed))


def build_model(config: ml_collections.ConfigDict, data: TaskData, *, load_weights: bool = True,
                ) -> tuple[UserLLM, Tokenizer, UserEncoder | None]:
  """User-LLM for the config; also returns a copy of the pretrained encoder (or None)."""
  seed = config.seed
  enc_cfg = encoder_config_of(config, data)
  with nnx.use_eager_sharding(False):
    encoder = UserEncoder(enc_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    pretrained = None
    if config.encoder.init == "pretrained" and load_weights:
      restore_module(encoder, os.path.join(os.path.expanduser(config.encoder.workdir),
                                           "checkpoints"))
      pretrained = nnx.clone(encoder)
    llm, tokenizer = load_llm(config.llm, seed)
    strategy = config.strategy.lower()
    apply_strategy_lora(llm, config, strategy, seed + 2)
    model = UserLLM(bridge_config(config), encoder=encoder, llm=llm, rngs=nnx.Rngs(seed + 3))
  strategies.check_strategy(model, strategy)
  return model, tokenizer, pretrained


def train_iterator(data: TaskData, transform: ex_lib.TaskExample,
                   config: ml_collections.ConfigDict, train_cfg: trainer_lib.TrainConfig):
  source = ex_lib.TaskSource(data.train, transform.cfg.tasks)
  return iter(pipeline_lib.make_pipeline(
      source, batch_size=train_cfg.batch_size // jax.process_count(), seed=config.seed,
      shuffle=True, num_epochs=None, transforms=[transform],
      worker_count=config.data.worker_count))


def mesh_of(config: ml_collections.ConfigDict):
  mesh = sharding_lib.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  rules = tuple(tuple(r) for r in config.mesh.rules) or sharding_lib.DEFAULT_RULES
  return mesh, rules


def param_checksum(model: nnx.Module, wrt: Any = nnx.Param) -> float:
  """Sum of |w| over the selected parameters (float64): a cheap identity check of weights."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(nnx.state(model, wrt))))


def results_table(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], ks: Sequence[int],
                  ) -> str:
  """Rows = methods, columns = Recall@k, accuracy, ROUGE-Lsum (blank when not measured)."""
  cols = ([(prompts.NEXT_ITEM, f"recall@{k}") for k in ks]
          + [(prompts.FAVORITE_CATEGORY, "accuracy"), (prompts.REVIEW, "rougeLsum")])
  cols = [c for c in cols if any(c[0] in m for m in metrics.values())]
  rows = []
  for name, by_task in metrics.items():
    row = [name]
    for task, key in cols:
      value = by_task.get(task, {}).get(key)
      row.append(float(value) if value is not None else "-")
    rows.append(row)
  header = ["method"] + [("fav_acc" if k == "accuracy" else k) for _, k in cols]
  return summary_lib.format_table(rows, header)


def fingerprint(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
  plain = config_lib.to_plain(config)
  for key in ("eval", "name"):
    plain.pop(key, None)
  plain.get("data", {}).pop("worker_count", None)
  plain.get("train", {}).pop("log_every", None)
  plain.update(extra)
  return plain


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates User-LLM; returns the summary dict (or a preemption note)."""
  t0 = time.perf_counter()
  summary_lib.remove_stale(workdir)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  strategy = config.strategy.lower()
  if strategy not in strategies.STRATEGIES:
    raise config_lib.ConfigError(f"config key 'strategy' is {config.strategy!r}; expected one "
                                 f"of {strategies.STRATEGIES}")
  mesh, rules = mesh_of(config)
  data = load_task_data(config, workdir)
  model, tokenizer, pretrained = build_model(config, data)
  transform = ex_lib.TaskExample(data.vocab, tokenizer, example_config(config, vocab=data.vocab))
  baselines = encoder_baselines(pretrained, data, config, transform)
  del pretrained
  wrt = strategies.trainable_filter(strategy)
  result = trainer_lib.train(
      model, lambda m, b: m.loss(b, deterministic=False), train_cfg,
      train_iterator(data, transform, config, train_cfg), mesh=mesh, rules=rules,
      seed=config.seed, wrt=wrt, workdir=workdir, fingerprint=fingerprint(config),
      count_fn=lambda b: int(np.asarray(b[ex_lib.LOSS_MASK]).sum()),
      desc=f"user-llm {config.bridge.mode}/{strategy}")
  if result.preempted:
    return {"preempted": True, "step": result.step}
  train_time = time.perf_counter() - t0
  t_eval = time.perf_counter()
  user_llm = evaluate_tasks(eval_lib.user_llm_conditioner(result.model, tokenizer.pad_id),
                            data, transform, config)
  eval_time = time.perf_counter() - t_eval
  metrics: dict[str, dict[str, Any]] = {"user_llm": user_llm}
  metrics.update(baselines)
  groups = strategies.param_groups(result.model)
  wall = time.perf_counter() - t0
  summary = {
      "config_name": config.name, "job": config.job, "metrics": metrics,
      "strategy": strategy, "mode": config.bridge.mode,
      "use_perceiver": bool(config.bridge.use_perceiver), "encoder_init": config.encoder.init,
      "llm": config.llm.source, "trainable_params": result.trainable_params,
      "total_params": result.total_params, "param_groups": groups,
      "trainable_checksum": param_checksum(result.model, wrt),
      "steps": result.step, "resumed_from": result.resumed_from,
      "budget": {"steps": result.step, "batch_size": train_cfg.batch_size,
                 "examples_seen": result.step * train_cfg.batch_size,
                 "train_sec": train_time, "eval_sec": eval_time},
      "wall_time_sec": wall, "history": result.history,
      "dataset": {"path": data.path, "protocol": config.data.protocol,
                  "window": config.data.window, "num_items": data.vocab.num_items,
                  "test_records": len(data.test), "train_records": len(data.train)},
  }
  table = results_table(metrics, tuple(config.eval.ks))
  procedures = "\n".join(
      [f"  {task}: {m['procedure']}" for task, m in user_llm.items()]
      + [f"  {name} ({task}): {m['procedure']}" for name, by_task in baselines.items()
         for task, m in by_task.items()])
  text = (f"{config.name}: User-LLM ({config.bridge.mode}, perceiver="
          f"{bool(config.bridge.use_perceiver)}, strategy={strategy}, encoder="
          f"{config.encoder.init}), {result.step} steps x batch {train_cfg.batch_size}, "
          f"{result.trainable_params:,} trainable / {result.total_params:,} params, "
          f"{wall:.1f} s wall\n{table}\nprocedures:\n{procedures}")
  if result.history:
    summary_lib.plot_loss(result.history, os.path.join(workdir, summary_lib.LOSS_PNG),
                          title=config.name)
  summary_lib.write_summary(workdir, summary, text)
  print(text, flush=True)
  return summary
