"""The paper's four training strategies as `nnx` parameter filters.

Which parameters train is a filter handed to `nnx.Optimizer(model, tx, wrt=filter)` and to
`nnx.grad(..., argnums=nnx.DiffState(0, filter))`, never a second code path:

  full   LLM + encoder + bridge
  lora   LoRA params of the LLM + encoder + bridge (base LLM frozen)
  enc    encoder + bridge (LLM frozen)
  proj   bridge only (encoder and LLM frozen)

The filters address a `UserLLM` by path: `encoder/...`, `bridge/...` (projection and
Perceiver) and `llm/...` (the decoder). Cross-attention blocks live inside the decoder at
`llm/cross_attention/...` but are new, randomly initialised bridge parameters, so they count
as bridge and train under every strategy; so do the optional copy head at `llm/copy_head/...`
(copies of the user's memory tokens mixed into the output) and `item_head` (full-catalogue
item scores from the LLM state). The frozen copy of the encoder that the item head's skip
may read (`skip_encoder/...`, `UserLlmConfig.item_head_skip_frozen`) trains under none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from user_llm_jax import params as params_lib
from user_llm_jax.llm.lora import LoraParam

STRATEGIES = ("full", "lora", "enc", "proj")
# The text-prompt baseline has no encoder or bridge: the LLM alone, untrained or trained.
TEXT_STRATEGIES = ("zero_shot", "lora", "full")

Filter = Any  # an nnx filter: a type, a predicate `(path, value) -> bool`, or a combinator


@dataclasses.dataclass(frozen=True)
class PathPrefix:
  """Selects variables whose path starts with `prefix` (compared as strings)."""

  prefix: tuple[str, ...]

  def __call__(self, path: tuple[Any, ...], x: Any) -> bool:
    del x
    n = len(self.prefix)
    return len(path) >= n and tuple(str(p) for p in path[:n]) == self.prefix

  def __repr__(self) -> str:
    return f"PathPrefix({'/'.join(self.prefix)!r})"


ENCODER = PathPrefix(("encoder",))
BRIDGE = nnx.Any(PathPrefix(("bridge",)), PathPrefix(("llm", "cross_attention")),
                 PathPrefix(("llm", "copy_head")), PathPrefix(("item_head",)))
LLM = nnx.All(PathPrefix(("llm",)), nnx.Not(PathPrefix(("llm", "cross_attention"))),
              nnx.Not(PathPrefix(("llm", "copy_head"))))
SKIP_ENCODER = PathPrefix(("skip_encoder",))


# Adapter weights of `llm.lora` and Flax's own LoRA layers (`nnx.LoRA`) alike.
LORA = nnx.Any(nnx.OfType(LoraParam), nnx.OfType(nnx.LoRAParam))


def trainable_filter(strategy: str) -> Filter:
  """The `wrt` filter of `strategy` (one of `STRATEGIES`, case-insensitive).

  Raises:
    ValueError: for an unknown strategy name.
  """
  name = strategy.lower()
  if name == "full":
    return nnx.All(nnx.Param, nnx.Not(SKIP_ENCODER))
  if name == "lora":
    # LoRA factors only exist inside the LLM; any LoRA factor elsewhere still trains.
    return nnx.All(nnx.Param, nnx.Any(LORA, ENCODER, BRIDGE))
  if name == "enc":
    return nnx.All(nnx.Param, nnx.Any(ENCODER, BRIDGE))
  if name == "proj":
    return nnx.All(nnx.Param, BRIDGE)
  raise ValueError(f"unknown training strategy {strategy!r}; expected one of {STRATEGIES}")


# The modules of a `UserLLM` by name, for stages that train a named subset of them (the
# alignment stage trains the bridge alone under the frozen LLM).
MODULES: dict[str, Filter] = {
    "encoder": ENCODER,
    "projection": PathPrefix(("bridge", "projection")),
    "perceiver": PathPrefix(("bridge", "perceiver")),
    "cross_attention": PathPrefix(("llm", "cross_attention")),
    "copy_head": PathPrefix(("llm", "copy_head")),
    "item_head": PathPrefix(("item_head",)),
}


def module_filter(names: tuple[str, ...] | list[str]) -> Filter:
  """The parameters of the named modules (keys of `MODULES`).

  Raises:
    ValueError: for an empty selection or an unknown name.
  """
  unknown = [n for n in names if n not in MODULES]
  if unknown or not names:
    raise ValueError(f"modules {tuple(names)}: unknown {unknown}; expected names among "
                     f"{tuple(MODULES)}")
  return nnx.All(nnx.Param, nnx.Any(*(MODULES[n] for n in names)))


def text_trainable_filter(strategy: str) -> Filter:
  """The `wrt` filter of a text-prompt baseline strategy over a bare `Decoder`.

  Raises:
    ValueError: for 'zero_shot' (nothing trains) or an unknown name.
  """
  name = strategy.lower()
  if name == "lora":
    return nnx.All(nnx.Param, LORA)
  if name == "full":
    return nnx.Param
  raise ValueError(f"text-prompt strategy {strategy!r} trains nothing or is unknown; "
                   f"expected one of {TEXT_STRATEGIES[1:]}")


def frozen_filter(strategy: str) -> Filter:
  """Parameters that `strategy` keeps fixed (the complement of `trainable_filter`)."""
  return nnx.All(nnx.Param, nnx.Not(trainable_filter(strategy)))


def trainable_and_total(model: nnx.Module, wrt: Filter | str) -> tuple[int, int]:
  """(trainable, total) scalar parameter counts; `wrt` is a filter or a strategy name."""
  if isinstance(wrt, str):
    wrt = trainable_filter(wrt)
  return (params_lib.count_params(model, nnx.All(nnx.Param, wrt)),
          params_lib.count_params(model, nnx.Param))


def param_groups(model: nnx.Module) -> dict[str, int]:
  """Scalar parameter counts per group: encoder, bridge, llm (base) and llm_lora, plus
  skip_encoder (the item head's frozen encoder copy, trained by no strategy) when the
  model has one."""
  lora = LORA
  groups = {
      "encoder": nnx.All(nnx.Param, ENCODER),
      "bridge": nnx.All(nnx.Param, BRIDGE),
      "llm": nnx.All(nnx.Param, LLM, nnx.Not(lora)),
      "llm_lora": nnx.All(nnx.Param, LLM, lora),
  }
  counts = {k: params_lib.count_params(model, f) for k, f in groups.items()}
  frozen = params_lib.count_params(model, nnx.All(nnx.Param, SKIP_ENCODER))
  return {**counts, "skip_encoder": frozen} if frozen else counts


def gradient_groups(model: nnx.Module) -> dict[str, Filter]:
  """The parameter groups of a `UserLLM` whose gradient norms a run logs.

  encoder, projection (+ Perceiver), cross-attention blocks, item head and LLM LoRA factors
  (the groups a model lacks are left out).
  """
  groups = {
      "encoder": ENCODER,
      "projection": PathPrefix(("bridge",)),
      "cross_attention": PathPrefix(("llm", "cross_attention")),
      "copy_head": PathPrefix(("llm", "copy_head")),
      "item_head": PathPrefix(("item_head",)),
      "llm_lora": nnx.All(LLM, LORA),
  }
  return {k: f for k, f in groups.items()
          if params_lib.count_params(model, nnx.All(nnx.Param, f))}


def check_strategy(model: nnx.Module, strategy: str) -> tuple[int, int]:
  """Validates that `strategy` trains something sensible on `model`; returns the counts.

  Raises:
    ValueError: if the model lacks a part the strategy relies on (e.g. 'lora' without LoRA
      factors in the LLM, which would silently train like 'enc'), or if parameters sit
      outside the encoder / bridge / llm groups (they would be frozen by accident).
  """
  groups = param_groups(model)
  trainable, total = trainable_and_total(model, strategy)
  if strategy.lower() == "lora" and not groups["llm_lora"]:
    raise ValueError("strategy 'lora' needs LoRA parameters in the LLM; apply LoRA to the "
                     "decoder first (user_llm_jax.llm.lora)")
  if sum(groups.values()) != total:
    raise ValueError(
        f"{total - sum(groups.values())} parameters are outside the encoder/bridge/llm "
        f"groups ({groups}); the strategy filters would not cover them")
  if trainable == 0:
    raise ValueError(f"strategy {strategy!r} selects no parameter of this model")
  return trainable, total
