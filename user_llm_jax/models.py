"""Building every model of the project from a config, and from a run's saved description.

One config path per model, in every job:

  encoder.model   the user encoder's architecture (`EncoderConfig` keys; preset + values)
  llm             which decoder LLM and tokenizer (`llm.source`, `llm.preset` for random)
  bridge          how the encoder reaches the LLM (`UserLlmConfig` keys)
  lora, strategy  adapters and what trains

A run writes the frozen architectures it built (`architecture(...)`) into its workdir
(`runs.save_run`); downstream jobs rebuild the models from that record
(`encoder_from_architecture`, `user_llm_from_architecture`), never from a report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import layer_scan
from user_llm_jax.bridge import strategies
from user_llm_jax.bridge.user_llm import UserLLM, UserLlmConfig
from user_llm_jax.data import schema
from user_llm_jax.encoder import config as encoder_config
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.llm import loading
from user_llm_jax.llm import lora as lora_lib
from user_llm_jax.llm.config import LlmConfig, RopeScaling, get_preset
from user_llm_jax.llm.model import Decoder, set_layer_scan
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import prompts

ENCODER_PRESETS = {"paper": encoder_config.ENCODER_PAPER, "tiny": encoder_config.ENCODER_TINY}


# ------------------------------------------------------------------------------- encoder


def encoder_config_from(model: Mapping[str, Any], vocab: schema.Vocabulary, *, window: int,
                        max_categories: int,
                        path: str = "encoder.model") -> encoder_config.EncoderConfig:
  """`encoder.model` (preset + overrides) and the data's sizes -> `EncoderConfig`.

  Args:
    model: the config section (its `preset` and the keys it sets).
    vocab: the prepared dataset's vocabulary (item / rating / category counts).
    window: events the encoder reads (`data.window`).
    max_categories: category slots per event (`data.max_categories`).
    path: the section's config path, for error messages.
  """
  section = dict(model)
  preset = section.pop("preset")
  if preset not in ENCODER_PRESETS:
    raise config_lib.ConfigError(
        f"config key '{path}.preset' is {preset!r}; expected one of {sorted(ENCODER_PRESETS)}")
  for key in ("dtype", "param_dtype"):
    if section.get(key) is not None:
      try:
        section[key] = jnp.dtype(section[key]).type
      except TypeError as e:
        raise config_lib.ConfigError(
            f"config key '{path}.{key}' is {section[key]!r}; expected a dtype name such as "
            "'float32' or 'bfloat16'") from e
  return config_lib.to_dataclass(
      encoder_config.EncoderConfig, section, path, base=ENCODER_PRESETS[preset],
      num_items=vocab.num_items, num_ratings=vocab.num_ratings,
      num_categories=vocab.num_categories, max_len=window, max_categories=max_categories)


def build_encoder(cfg: encoder_config.EncoderConfig, seed: int) -> UserEncoder:
  """A randomly initialised (unsharded) user encoder."""
  with nnx.use_eager_sharding(False):
    return UserEncoder(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


# ---------------------------------------------------------------------------------- LLM


def load_llm(llm: ml_collections.ConfigDict, seed: int) -> tuple[Decoder, Tokenizer]:
  """The configured decoder and tokenizer ('random' pairs a preset LLM with byte tokens)."""
  with nnx.use_eager_sharding(False):
    if llm.source == "random":
      tokenizer = prompts.byte_level_tokenizer()
      cfg = get_preset(llm.preset, vocab_size=tokenizer.vocab_size, dtype=llm.dtype,
                       param_dtype=llm.get("param_dtype", "float32"))
      return set_llm_layout(loading.load_llm("random", cfg, seed=seed).model, llm), tokenizer
    loaded = loading.load_llm(llm.source, dtype=llm.dtype, param_dtype=llm.get("param_dtype"),
                              cache_dir=os.path.expanduser(llm.cache_dir) or None)
  if loaded.tokenizer is None:
    raise FileNotFoundError(f"config key 'llm.source'={llm.source!r} has no tokenizer "
                            "(tokenizer.json) next to the weights")
  return set_llm_layout(loaded.model, llm), loaded.tokenizer


def set_llm_layout(model: Decoder, llm: ml_collections.ConfigDict) -> Decoder:
  """Stacks `model`'s layers for `llm.scan_layers`, with `llm.remat_policy` (in place).

  Loaders always build unrolled layers (checkpoints are per layer); absent keys keep them.
  """
  policy = llm.get("remat_policy", "none")
  if policy not in layer_scan.REMAT_POLICIES:
    raise config_lib.ConfigError(f"config key 'llm.remat_policy' is {policy!r}; expected "
                                 f"one of {sorted(layer_scan.REMAT_POLICIES)}")
  with nnx.use_eager_sharding(False):
    return set_layer_scan(model, bool(llm.get("scan_layers", False)), policy)


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  return lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                             targets=tuple(config.lora.targets))


def apply_lora(llm: Decoder, cfg: lora_lib.LoraConfig | None, seed: int) -> None:
  """Adds LoRA adapters to `llm` in place (nothing when `cfg` is None)."""
  if cfg is not None:
    with nnx.use_eager_sharding(False):
      lora_lib.apply_lora(llm, cfg, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------ User-LLM


def bridge_config(config: ml_collections.ConfigDict) -> UserLlmConfig:
  return config_lib.to_dataclass(UserLlmConfig, config.bridge, "bridge")


def check_strategy_name(strategy: str, allowed: tuple[str, ...] = strategies.STRATEGIES,
                        key: str = "strategy") -> str:
  """The lower-cased strategy name, or a ConfigError naming the key and the choices."""
  name = strategy.lower()
  if name not in allowed:
    raise config_lib.ConfigError(f"config key {key!r} is {strategy!r}; expected one of "
                                 f"{allowed}")
  return name


def assemble_user_llm(bridge: UserLlmConfig, encoder: UserEncoder, llm: Decoder, *,
                      strategy: str, lora: lora_lib.LoraConfig | None, seed: int,
                      category_tokens: Any = None, lowercase_tokens: Any = None,
                      copy_start_token: int | None = None) -> UserLLM:
  """Encoder + LLM (+ LoRA for the 'lora' strategy) + a new bridge, checked for `strategy`.

  `category_tokens`: the category names' tokens for `bridge.category_text`
  (`category_text.token_table`; None: the text table stays 0 until a checkpoint restores it).
  `lowercase_tokens`, `copy_start_token`: the copy head's tables (`UserLLM`), for
  `bridge.copy_head`.
  """
  apply_lora(llm, lora if strategy == "lora" else None, seed + 2)
  with nnx.use_eager_sharding(False):
    model = UserLLM(bridge, encoder=encoder, llm=llm, rngs=nnx.Rngs(seed + 3),
                    category_tokens=category_tokens, lowercase_tokens=lowercase_tokens,
                    copy_start_token=copy_start_token)
  strategies.check_strategy(model, strategy)
  return model


# ------------------------------------------------------------------- saved architectures


def _jsonable_dataclass(obj: Any) -> dict[str, Any]:
  out = {}
  for k, v in dataclasses.asdict(obj).items():
    if k.endswith("dtype"):
      v = jnp.dtype(v).name
    out[k] = v
  return out


def architecture(*, encoder: encoder_config.EncoderConfig | None = None,
                 llm: LlmConfig | None = None, bridge: UserLlmConfig | None = None,
                 lora: lora_lib.LoraConfig | None = None,
                 strategy: str | None = None) -> dict[str, Any]:
  """The frozen architecture of a run's models, as JSON (`runs.save_run` writes it)."""
  out: dict[str, Any] = {}
  if encoder is not None:
    # How the layers run (stacked or not, remat) is not architecture: checkpoints hold
    # the layers per layer either way, and a rebuilt encoder runs them unrolled.
    out["encoder"] = {k: v for k, v in _jsonable_dataclass(encoder).items()
                      if k not in ("scan_layers", "remat_policy")}
  if llm is not None:
    out["llm"] = _jsonable_dataclass(llm)
  if bridge is not None:
    out["bridge"] = _jsonable_dataclass(bridge)
  if lora is not None:
    out["lora"] = _jsonable_dataclass(lora)
  if strategy is not None:
    out["strategy"] = strategy
  return out


def encoder_config_from_architecture(arch: Mapping[str, Any]) -> encoder_config.EncoderConfig:
  fields = {k: (jnp.dtype(v).type if k.endswith("dtype") else v)
            for k, v in arch["encoder"].items()}
  return encoder_config.EncoderConfig(**fields)


def llm_config_from_architecture(arch: Mapping[str, Any]) -> LlmConfig:
  fields = dict(arch["llm"])
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  return LlmConfig(**fields)


def lora_config_from_architecture(arch: Mapping[str, Any]) -> lora_lib.LoraConfig | None:
  """The saved LoRA adapters' config (None: the run has no adapters)."""
  if "lora" not in arch:
    return None
  return lora_lib.LoraConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                for k, v in arch["lora"].items()})


def encoder_from_architecture(arch: Mapping[str, Any], seed: int = 0) -> UserEncoder:
  return build_encoder(encoder_config_from_architecture(arch), seed)


def user_llm_from_architecture(arch: Mapping[str, Any], seed: int = 0) -> UserLLM:
  """A User-LLM of the saved architecture with fresh weights (restore them afterwards)."""
  for key in ("encoder", "llm", "bridge", "strategy"):
    if key not in arch:
      raise KeyError(f"the saved architecture has no {key!r} entry (has {sorted(arch)})")
  encoder = encoder_from_architecture(arch, seed)
  with nnx.use_eager_sharding(False):
    llm = Decoder(llm_config_from_architecture(arch), rngs=nnx.Rngs(seed))
  lora = lora_config_from_architecture(arch)
  bridge = UserLlmConfig(**arch["bridge"])
  return assemble_user_llm(bridge, encoder, llm, strategy=arch["strategy"], lora=lora,
                           seed=seed)
