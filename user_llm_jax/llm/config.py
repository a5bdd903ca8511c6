"""Architecture hyper-parameters of Llama-family decoders, with named presets.

`LlmConfig` is a frozen dataclass (hashable, so it can be a static jit argument); the
`PRESETS` dict maps preset names used in experiment configs to the published
hyper-parameters of each checkpoint (taken from the checkpoints' own `config.json`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

RopeLayout = Literal["rotate_half", "interleaved"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style RoPE frequency scaling (`rope_type='llama3'` in HF configs).

  Attributes:
    factor: how much longer the target context is than the original one.
    low_freq_factor: wavelengths above original_max/low_freq_factor are scaled by `factor`.
    high_freq_factor: wavelengths below original_max/high_freq_factor are kept as-is.
    original_max_position_embeddings: the context length the model was pretrained with.
  """
  factor: float = 32.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Hyper-parameters of a Llama-family decoder.

  Attributes:
    vocab_size: number of token ids V.
    width: model width D.
    num_layers: number of decoder layers L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
    head_dim: per-head width H.
    mlp_dim: SwiGLU hidden width F.
    rope_base: RoPE base frequency (HF `rope_theta`).
    rope_scaling: optional Llama-3 frequency scaling.
    rope_layout: which dimensions form a rotation pair: 'rotate_half' (HF: i and i+H/2)
      or 'interleaved' (original Llama / llama.cpp: 2i and 2i+1).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output head shares the token embedding matrix.
    max_seq_len: longest context the checkpoint supports.
    dtype: compute dtype name ('float32' or 'bfloat16').
    param_dtype: storage dtype name of the parameters (float32).
  """
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rope_layout: RopeLayout = "rotate_half"
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlmConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlmConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlmConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.rope_layout not in ("rotate_half", "interleaved"):
      raise ValueError(f"LlmConfig.rope_layout must be 'rotate_half' or 'interleaved', "
                       f"got {self.rope_layout!r}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"LlmConfig.{name}={getattr(self, name)!r} is not a dtype") from e

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "LlmConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlmConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown LlmConfig keys {sorted(unknown)}")
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], RopeScaling):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


SMOLLM2_135M = LlmConfig(
    vocab_size=49152, width=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    mlp_dim=1536, rope_base=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)

SMOLLM2_360M = LlmConfig(
    vocab_size=49152, width=960, num_layers=32, num_heads=15, num_kv_heads=5, head_dim=64,
    mlp_dim=2560, rope_base=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)

SMOLLM2_1_7B = LlmConfig(
    vocab_size=49152, width=2048, num_layers=24, num_heads=32, num_kv_heads=32, head_dim=64,
    mlp_dim=8192, rope_base=130_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)

_LLAMA3_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)

LLAMA_3_2_1B = LlmConfig(
    vocab_size=128256, width=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
    mlp_dim=8192, rope_base=500_000.0, rope_scaling=_LLAMA3_SCALING, norm_eps=1e-5,
    tie_embeddings=True, max_seq_len=131072)

LLAMA_3_2_3B = LlmConfig(
    vocab_size=128256, width=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
    mlp_dim=8192, rope_base=500_000.0, rope_scaling=_LLAMA3_SCALING, norm_eps=1e-5,
    tie_embeddings=True, max_seq_len=131072)

# Test preset: 4 layers so cross-attention every k layers is testable; 8 query / 4 kv heads
# (GQA, and divisible by a 4-way tensor axis); untied head to exercise both head paths
# (`LLM_TINY.replace(tie_embeddings=True)` for the other).
LLM_TINY = LlmConfig(
    vocab_size=256, width=64, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16,
    mlp_dim=128, rope_base=10_000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=256)

PRESETS: dict[str, LlmConfig] = {
    "smollm2_135m": SMOLLM2_135M,
    "smollm2_360m": SMOLLM2_360M,
    "smollm2_1_7b": SMOLLM2_1_7B,
    "llama_3_2_1b": LLAMA_3_2_1B,
    "llama_3_2_3b": LLAMA_3_2_3B,
    "tiny": LLM_TINY,
}


def get_preset(name: str, **overrides: Any) -> LlmConfig:
  """Returns preset `name` (case-insensitive) with `overrides` applied."""
  key = name.lower().replace("-", "_").replace(".", "_")
  if key not in PRESETS:
    raise KeyError(f"unknown LLM preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
