"""The jitted programs a config's job runs, lowered with abstract inputs on any mesh.

Nothing here allocates a weight or reads a dataset: models and optimizer states come from
`nnx.eval_shape`, batches are `jax.ShapeDtypeStruct`s with the job's shardings, and the
functions lowered are the ones the jobs run:

  encoder pretraining   `TrainStep` over `UserEncoder.pretrain_loss`;
                        `eval.retrieval._batch_ranks` (full-catalogue ranking)
  User-LLM              `TrainStep` over `UserLLM.loss` (the strategy's `wrt` filter,
                        the logged gradient groups); the evaluation's user context
                        (`tasks.evaluate._user_context`), `llm.sampler.prefill_jitted` and
                        `decode_jitted` (greedy answers); the item head's ranking

Vocabulary sizes come from the config's `aot` section (the target dataset need not exist
on the compiling host); the LLM's architecture from its checkpoint's config when the
checkpoint is on this host, else from `llm.preset`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import sharding
from user_llm_jax.bridge import strategies
from user_llm_jax.data import schema
from user_llm_jax.data import transforms
from user_llm_jax.encoder import config as encoder_config
from user_llm_jax.eval import retrieval
from user_llm_jax.llm import checkpoint as llm_checkpoint
from user_llm_jax.llm import safetensors_io
from user_llm_jax.llm import sampler
from user_llm_jax.llm.config import LlmConfig, get_preset
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.train import train_step as train_step_lib
from user_llm_jax.train import trainer as trainer_lib

AOT_KEYS = ("num_items", "num_ratings", "num_categories")
Outputs = dict[str, Any]  # program name -> its abstract outputs (with shardings)


@dataclasses.dataclass(frozen=True)
class VocabSizes:
  """The target dataset's vocabulary sizes (reserved PAD / OOV ids included)."""

  num_items: int
  num_ratings: int
  num_categories: int


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted function of a job, ready to lower.

  Attributes:
    name: e.g. 'user_llm/train_step'.
    lower: `outputs -> jax.stages.Lowered`; `outputs` holds the abstract outputs of the
      programs compiled before it (decoding starts from the prefill's state).
    batch: global examples per call.
    tokens: tokens (text) or events (encoder) processed per call, globally.
    unit: 'tokens' or 'events'.
    note: what the call does, for the table.
  """

  name: str
  lower: Callable[[Outputs], jax.stages.Lowered]
  batch: int
  tokens: int
  unit: str
  note: str


@dataclasses.dataclass
class Plan:
  """The programs of a config and what they were built from (for the report)."""

  programs: list[Program]
  facts: dict[str, Any]


def vocab_sizes(config: ml_collections.ConfigDict) -> VocabSizes:
  """`config.aot`'s vocabulary sizes.

  Raises:
    ConfigError: the section or a key is missing, or a size is too small (named).
  """
  hint = (f"set the target dataset's sizes, e.g. --config.aot.num_items=26746 (each "
          f"includes the {schema.FIRST_ID} reserved ids PAD/OOV)")
  if "aot" not in config:
    raise config_lib.ConfigError(f"config has no 'aot' section ({', '.join(AOT_KEYS)}): "
                                 f"the compile check cannot size the vocabularies; {hint}")
  sizes = {}
  for key in AOT_KEYS:
    value = config.aot.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= schema.FIRST_ID:
      raise config_lib.ConfigError(f"config key 'aot.{key}' is {value!r}; expected an int > "
                                   f"{schema.FIRST_ID}: {hint}")
    sizes[key] = value
  return VocabSizes(**sizes)


def encoder_cfg(config: ml_collections.ConfigDict, section: Mapping[str, Any],
                vocab: VocabSizes, path: str) -> encoder_config.EncoderConfig:
  """The encoder architecture a run would build from `section` on the target data."""
  return models.encoder_config_from(section, vocab, window=config.data.window,  # type: ignore[arg-type]
                                    max_categories=config.data.max_categories, path=path)


def llm_cfg(llm: ml_collections.ConfigDict) -> tuple[LlmConfig, str]:
  """(architecture, where it came from) of the config's LLM, at its dtypes.

  The checkpoint's own config when `llm.source` is on this host; 'smollm2' is the
  SmolLM2-135M preset; otherwise (a checkpoint that lives on the TPU VMs) `llm.preset`.
  """
  source = str(llm.source)
  path = pathlib.Path(os.path.expanduser(source))
  if source == "random":
    cfg = get_preset(llm.preset, vocab_size=prompts.byte_level_tokenizer().vocab_size)
    origin = f"llm.preset={llm.preset!r} (random init, byte-level tokens)"
  elif source.lower() == "smollm2":
    cfg, origin = get_preset("smollm2_135m"), "llm.source='smollm2' (SmolLM2-135M)"
  elif llm_checkpoint.is_checkpoint_dir(path):
    cfg = LlmConfig.from_dict(json.loads((path / llm_checkpoint.CONFIG_FILE).read_text()))
    origin = f"{path / llm_checkpoint.CONFIG_FILE}"
  elif (path / safetensors_io.CONFIG_JSON).is_file():
    hf = json.loads((path / safetensors_io.CONFIG_JSON).read_text())
    cfg = safetensors_io.config_from_hf(hf, source=str(path / safetensors_io.CONFIG_JSON))
    origin = f"{path / safetensors_io.CONFIG_JSON}"
  else:
    cfg = get_preset(llm.preset)
    origin = f"llm.preset={llm.preset!r} (llm.source {source!r} is not on this host)"
  param_dtype = llm.get("param_dtype", cfg.param_dtype)
  return cfg.replace(dtype=llm.dtype, param_dtype=param_dtype), origin


def _encoder_example(window: int, max_categories: int) -> dict[str, np.ndarray]:
  """One example of the encoder's input contract, made by the real transform."""
  record = {schema.USER_ID: b"u", schema.ITEM_IDS: np.array([2, 3, 4]),
            schema.RATINGS: np.array([2, 3, 2]), schema.TIMESTAMPS: np.array([0, 60, 120]),
            schema.CATEGORY_IDS: np.array([2, 3, 2]),
            schema.CATEGORY_LENGTHS: np.array([1, 1, 1])}
  return transforms.CropAndPad(window, max_categories).map(record)


def _task_example(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One example of the task-batch contract (`tasks.examples.TaskExample.map`'s keys)."""
  t = ex_lib.ExampleConfig(window=config.data.window,
                           max_categories=config.data.max_categories,
                           max_prompt_tokens=config.tasks.max_prompt_tokens,
                           max_answer_tokens=config.tasks.max_answer_tokens).text_length
  out = _encoder_example(config.data.window, config.data.max_categories)
  out.update({ex_lib.TOKENS: np.zeros(t, np.int32), ex_lib.TEXT_MASK: np.zeros(t, bool),
              ex_lib.LOSS_MASK: np.zeros(t, bool), ex_lib.PROMPT_LENGTH: np.int32(0),
              ex_lib.ANSWER_LENGTH: np.int32(0), ex_lib.TASK_ID: np.int32(0),
              ex_lib.TARGET_ITEM: np.int32(0), ex_lib.LABEL: np.int32(0),
              ex_lib.HAS_ANSWER: np.bool_(True)})
  return out


def batch_spec(example: Mapping[str, np.ndarray], batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch of `batch` examples like `example` (numeric keys, as jobs pass them)."""
  return {k: jax.ShapeDtypeStruct((batch,) + np.shape(v), np.asarray(v).dtype)
          for k, v in example.items() if np.asarray(v).dtype.kind in "biuf"}


def _placed(tree: Any, mesh: jax.sharding.Mesh, logical: tuple[str | None, ...]) -> Any:
  """Abstract arrays sharded by the logical names of their leading axes."""
  def one(x):
    names = (logical + (None,) * x.ndim)[:x.ndim]
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding.logical_sharding(mesh, names))
  return jax.tree.map(one, tree)


def _abstract_params(module: nnx.Module, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(graphdef, abstract state placed like the trained model's) of an abstract module."""
  graphdef, state = nnx.split(module)
  return graphdef, train_step_lib.place(state, sharding.model_shardings(state, mesh))


def _with_shardings(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      lowered.out_info, compiled.output_shardings)


def _under_rules(mesh: jax.sharding.Mesh, rules: sharding.Rules,
                 fn: Callable[[], jax.stages.Lowered]) -> jax.stages.Lowered:
  # Activation constraints read the rules and the mesh when the function is traced.
  with sharding.axis_rules(rules, mesh):
    return fn()


def encoder_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     rules: sharding.Rules, *, model_path: str = "encoder.model",
                     train_path: str = "train", prefix: str = "encoder") -> Plan:
  """Encoder pretraining's train step and full-catalogue ranking step."""
  vocab = vocab_sizes(config)
  section = config
  for part in model_path.split("."):
    section = section[part]
  enc = encoder_cfg(config, section, vocab, model_path)
  train_section = config
  for part in train_path.split("."):
    train_section = train_section[part]
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, train_section, train_path)
  tx = train_step_lib.make_tx(train_cfg.optim())

  def build():
    model = models.build_encoder(enc, config.seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with sharding.axis_rules(rules):
    model, optimizer = nnx.eval_shape(build)
    step, state = train_step_lib.TrainStep.create(
        model, optimizer, lambda m, b: m.pretrain_loss(b, deterministic=False), mesh=mesh,
        rules=rules, seed=config.seed)
    graphdef, params = _abstract_params(model, mesh)
  example = _encoder_example(config.data.window, config.data.max_categories)
  b, e = train_cfg.batch_size, config.data.window
  train_batch = batch_spec(example, b)
  eb = int(config.eval.batch_size)
  eval_batch = _placed(batch_spec(example, eb), mesh, ("activation_batch",))
  programs = [
      Program(f"{prefix}/train_step", lambda _: step.lower(state, train_batch), b, b * e,
              "events", "TrainStep: pretrain_loss gradient + AdamW update"),
      Program(f"{prefix}/eval_ranks", lambda _: _under_rules(
          mesh, rules, lambda: retrieval._batch_ranks.lower(  # pylint: disable=protected-access
              retrieval._model_scores, graphdef, params, eval_batch)),  # pylint: disable=protected-access
          eb, eb * e, "events", "next-item scores over the whole catalogue + target ranks"),
  ]
  facts = {f"{prefix}_architecture": models.architecture(encoder=enc)["encoder"],
           f"{prefix}_state": state_bytes(state)}
  return Plan(programs, facts)


def user_llm_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      rules: sharding.Rules, *, prefix: str = "user_llm") -> Plan:
  """User-LLM's train step and its evaluation: user context, prefill, greedy decoding."""
  vocab = vocab_sizes(config)
  enc = encoder_cfg(config, config.encoder.model, vocab, "encoder.model")
  llm, origin = llm_cfg(config.llm)
  strategy = models.check_strategy_name(config.strategy)
  lora = models.lora_config(config) if strategy == "lora" else None
  bridge = models.bridge_config(config)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  tx = train_step_lib.make_tx(train_cfg.optim())
  wrt = strategies.trainable_filter(strategy)

  # Scanned / rematerialised decoder layers, when the config has those switches.
  layer_options = {k: config.llm[k] for k in ("scan_layers", "remat_policy") if k in config.llm}

  def build():
    encoder = models.build_encoder(enc, config.seed)
    with nnx.use_eager_sharding(False):
      decoder = Decoder(llm, rngs=nnx.Rngs(config.seed), **layer_options)
    model = models.assemble_user_llm(bridge, encoder, decoder, strategy=strategy, lora=lora,
                                     seed=config.seed)
    return model, nnx.Optimizer(model, tx, wrt=wrt)

  with sharding.axis_rules(rules):
    model, optimizer = nnx.eval_shape(build)
    step, state = train_step_lib.TrainStep.create(
        model, optimizer, lambda m, b: m.loss(b, deterministic=False), mesh=mesh,
        rules=rules, seed=config.seed, grad_groups=strategies.gradient_groups(model))
    context_def, context_params = _abstract_params((model.encoder, model.bridge), mesh)
    llm_def, llm_params = _abstract_params(model.llm, mesh)
    model_def, model_params = _abstract_params(model, mesh)

  example = _task_example(config)
  b = train_cfg.batch_size
  text = example[ex_lib.TOKENS].shape[0]
  eb = int(config.eval.batch_size)
  batch_axis = ("activation_batch",)
  enc_batch = _placed({k: v for k, v in batch_spec(example, eb).items()
                       if k in evaluate.ENCODER_KEYS}, mesh, batch_axis)
  # The sampler left-pads prompts to a multiple of its 16-token bucket and decodes the
  # answer plus its end token.
  prompt = -(-int(config.tasks.max_prompt_tokens) // 16) * 16
  new_tokens = int(config.tasks.max_answer_tokens) + 1
  tokens = _placed(jax.ShapeDtypeStruct((eb, prompt), jnp.int32), mesh, batch_axis)
  mask = _placed(jax.ShapeDtypeStruct((eb, prompt), jnp.bool_), mesh, batch_axis)
  stops = _placed(jax.ShapeDtypeStruct((eb, 1), jnp.int32), mesh, batch_axis)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  name = lambda s: f"{prefix}/{s}"  # noqa: E731

  def lower_context(_):
    target_rms = (None if model.bridge.prompt_gain is None
                  else jax.ShapeDtypeStruct((), jnp.float32))
    return _under_rules(mesh, rules, lambda: evaluate._user_context.lower(  # pylint: disable=protected-access
        context_def, context_params, enc_batch, target_rms))

  def lower_prefill(outputs):
    if bridge.mode != "cross_attention":
      raise NotImplementedError("the compile check decodes cross-attention User-LLMs; "
                                f"bridge.mode={bridge.mode!r} is compiled for training only")
    context, context_mask = outputs[name("user_context")]
    return _under_rules(mesh, rules, lambda: sampler.prefill_jitted.lower(
        llm_def, llm_params, tokens, mask, None, context, context_mask,
        cache_length=prompt + new_tokens))

  def lower_decode(outputs):
    logits, decode_state = outputs[name("prefill")]
    return _under_rules(mesh, rules, lambda: sampler.decode_jitted.lower(
        llm_def, llm_params, logits, decode_state, rng, stops, None,
        max_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0, pad_id=0))

  programs = [
      Program(name("train_step"), lambda _: step.lower(state, batch_spec(example, b)), b,
              b * text, "tokens", f"TrainStep: UserLLM.loss gradient ({strategy} strategy) + "
              "AdamW update"),
      Program(name("user_context"), lower_context, eb, eb * config.data.window, "events",
              "encoder + bridge of the evaluation batch"),
  ]
  if bridge.mode == "cross_attention":
    programs += [
        Program(name("prefill"), lower_prefill, eb, eb * prompt, "tokens",
                f"prompt ({prompt} tokens, left-padded) into a fresh KV cache"),
        Program(name("decode"), lower_decode, eb, eb * new_tokens, "tokens",
                f"greedy decoding loop, {new_tokens} tokens per row"),
    ]
  if bridge.item_head:
    item_batch = _placed(batch_spec(example, eb), mesh, batch_axis)
    programs.append(Program(
        name("eval_item_head"), lambda _: _under_rules(
            mesh, rules, lambda: retrieval._batch_ranks.lower(  # pylint: disable=protected-access
                retrieval._model_scores, model_def, model_params, item_batch)),  # pylint: disable=protected-access
        eb, eb * text, "tokens", "item head over the whole catalogue + target ranks"))
  facts = {f"{prefix}_llm": origin, f"{prefix}_strategy": strategy,
           f"{prefix}_architecture": models.architecture(encoder=enc, llm=llm, bridge=bridge,
                                                         lora=lora, strategy=strategy),
           f"{prefix}_state": state_bytes(state)}
  return Plan(programs, facts)


def record_outputs(outputs: Outputs, program: Program, lowered: jax.stages.Lowered,
                   compiled: jax.stages.Compiled) -> None:
  """Keeps a program's abstract outputs for the programs that start from them."""
  outputs[program.name] = _with_shardings(lowered, compiled)


def state_bytes(state: Any) -> dict[str, dict[str, int]]:
  """Global bytes of a train state by part ('model', 'optimizer') and dtype."""
  out: dict[str, dict[str, int]] = {}
  # `TrainStep` splits the pair (model, optimizer): the state's keys are 0 and 1.
  model_state, opt_state = state[0], state[1]
  for part, tree in (("model", model_state), ("optimizer", opt_state)):
    for leaf in jax.tree.leaves(tree):
      dtype = jnp.dtype(leaf.dtype)
      if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        continue
      by_dtype = out.setdefault(part, {})
      by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + int(np.prod(leaf.shape)) * dtype.itemsize
  return out


def memory_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The config's layer-memory switches (`remat_policy`, `scan_layers`), as dotted keys."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += memory_keys(value, f"{prefix}{key}.")
    elif key in ("remat_policy", "scan_layers"):
      out.append(f"{prefix}{key}")
  return out


def plan(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
         rules: sharding.Rules) -> Plan:
  """The programs of the config's job (`pretrain_encoder`, `train_user_llm`,
  `main_pipeline`: its encoder stage, then User-LLM).

  Raises:
    ConfigError: a job the compile check does not know, or a bad key (named).
  """
  job = config.get("job")
  if job == "pretrain_encoder":
    result = encoder_programs(config, mesh, rules)
  elif job == "train_user_llm":
    result = user_llm_programs(config, mesh, rules)
  elif job == "main_pipeline":
    first = encoder_programs(config, mesh, rules, train_path="encoder.train")
    second = user_llm_programs(config, mesh, rules)
    result = Plan(first.programs + second.programs, {**first.facts, **second.facts})
  else:
    raise config_lib.ConfigError(
        f"config key 'job' is {job!r}; the compile check knows 'pretrain_encoder', "
        "'train_user_llm' and 'main_pipeline'")
  result.facts["memory_keys"] = memory_keys(config)
  return result
