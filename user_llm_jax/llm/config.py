"""Architecture hyper-parameters of the decoders (Llama, Qwen2.5, Qwen3, Gemma 2, Gemma 3).

`LlmConfig` is a frozen dataclass (hashable, so it can be a static jit argument); the
`PRESETS` dict maps preset names used in experiment configs to the published
hyper-parameters of each checkpoint (taken from the checkpoints' own `config.json`).

The families share one decoder; they differ in a few switches whose defaults are Llama's:

  Qwen2.5   attention_bias (q/k/v biases)
  Qwen3     qk_norm (RMSNorm over each head's queries and keys, before RoPE)
  Gemma 2   scale_embeddings, norm_scale_offset=1 (RMSNorm by 1 + weight), gelu_tanh MLP,
            post_norms, query_pre_attn_scalar, attn/final logit soft-caps, sliding-window
            attention on alternate layers
  Gemma 3   as Gemma 2 without soft-caps, plus qk_norm and a RoPE base of its own for the
            sliding (local) layers
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

RopeLayout = Literal["rotate_half", "interleaved"]
MlpActivation = Literal["silu", "gelu_tanh"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling: Llama-3 style (`rope_type='llama3'` in HF configs) or linear.

  Attributes:
    factor: how much longer the target context is than the original one ('linear': every
      frequency is divided by it, as Gemma 3's global layers do).
    low_freq_factor: wavelengths above original_max/low_freq_factor are scaled by `factor`.
    high_freq_factor: wavelengths below original_max/high_freq_factor are kept as-is.
    original_max_position_embeddings: the context length the model was pretrained with.
    rope_type: 'llama3' or 'linear' (the other fields are unused by 'linear').
  """
  factor: float = 32.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  rope_type: Literal["llama3", "linear"] = "llama3"

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(f"RopeScaling.rope_type must be 'llama3' or 'linear', "
                       f"got {self.rope_type!r}")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Hyper-parameters of a decoder (Llama, Qwen2.5, Qwen3, Gemma 2 or Gemma 3 layout).

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
    attention_bias: biases on the q/k/v projections (Qwen2.5; the output has none).
    qk_norm: RMSNorm over the head dim of queries and keys, before RoPE (Qwen3, Gemma 3).
    norm_scale_offset: every RMSNorm multiplies by (offset + weight); Gemma stores its
      weights around 0 and uses 1.0, Llama 0.0.
    mlp_activation: gate activation of the gated MLP: 'silu' (SwiGLU) or 'gelu_tanh'
      (GeGLU with the tanh approximation, Gemma).
    post_norms: RMSNorm on the attention and MLP outputs before each residual add
      (Gemma 2/3 "sandwich" norms).
    scale_embeddings: multiply token embeddings by sqrt(width) (Gemma).
    query_pre_attn_scalar: attention logits are scaled by this ** -0.5 (Gemma); None
      means head_dim.
    attn_logit_softcap: attention logits pass through cap * tanh(logits / cap) (Gemma 2).
    final_logit_softcap: the same on the output logits (Gemma 2).
    sliding_window: keys a sliding layer's query at slot q sees: slots (q - W, q].
    sliding_layers: indices of the sliding-window layers (the others attend globally).
    local_rope_base: RoPE base of the sliding layers, without `rope_scaling` (Gemma 3);
      None: the sliding layers use `rope_base` and `rope_scaling` like the others.
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
  attention_bias: bool = False
  qk_norm: bool = False
  norm_scale_offset: float = 0.0
  mlp_activation: MlpActivation = "silu"
  post_norms: bool = False
  scale_embeddings: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()
  local_rope_base: float | None = None

  def __post_init__(self):
    # JSON (run.json, llm_config.json) gives lists; a tuple keeps the config hashable.
    object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))
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
    if self.mlp_activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"LlmConfig.mlp_activation must be 'silu' or 'gelu_tanh', "
                       f"got {self.mlp_activation!r}")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                 "sliding_window", "local_rope_base"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"LlmConfig.{name} must be positive or None, got {value}")
    bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"LlmConfig.sliding_layers {bad} are not layer indices "
                       f"[0, {self.num_layers})")
    if len(set(self.sliding_layers)) != len(self.sliding_layers):
      raise ValueError(f"LlmConfig.sliding_layers {self.sliding_layers} has duplicates")
    if self.sliding_layers and self.sliding_window is None:
      raise ValueError("LlmConfig.sliding_layers needs a sliding_window")
    if self.local_rope_base is not None and not self.sliding_layers:
      raise ValueError("LlmConfig.local_rope_base applies to sliding_layers, and there are none")

  def is_sliding(self, layer: int) -> bool:
    """True when decoder layer `layer` attends through the sliding window."""
    return layer in self.sliding_layers

  @property
  def attention_scale(self) -> float:
    """Factor on the attention logits q.k."""
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(scalar) ** -0.5

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



def alternating_sliding(num_layers: int, period: int) -> tuple[int, ...]:
  """Sliding layers of a local/global pattern: every `period`-th layer is global.

  HF Gemma configs' `sliding_window_pattern` (Gemma 2: 2, Gemma 3: 6): layer i slides
  unless (i + 1) % period == 0.
  """
  if period <= 0:
    raise ValueError(f"sliding pattern period must be positive, got {period}")
  return tuple(i for i in range(num_layers) if (i + 1) % period)


_QWEN = dict(vocab_size=151936, rope_base=1_000_000.0, norm_eps=1e-6, tie_embeddings=True)

QWEN2_5_0_5B = LlmConfig(
    width=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864,
    max_seq_len=32768, attention_bias=True, **_QWEN)

QWEN3_0_6B = LlmConfig(
    width=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
    max_seq_len=40960, qk_norm=True, **_QWEN)

# What every Gemma 2/3 decoder layer shares (their HF modules hard-code these).
_GEMMA = dict(norm_eps=1e-6, tie_embeddings=True, norm_scale_offset=1.0,
              mlp_activation="gelu_tanh", post_norms=True, scale_embeddings=True)

GEMMA2_2B = LlmConfig(
    vocab_size=256000, width=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
    mlp_dim=9216, rope_base=10_000.0, max_seq_len=8192, query_pre_attn_scalar=256.0,
    attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
    sliding_layers=alternating_sliding(26, 2), **_GEMMA)

GEMMA3_270M = LlmConfig(
    vocab_size=262144, width=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
    mlp_dim=2048, rope_base=1_000_000.0, max_seq_len=32768, query_pre_attn_scalar=256.0,
    qk_norm=True, sliding_window=512, sliding_layers=alternating_sliding(18, 6),
    local_rope_base=10_000.0, **_GEMMA)

GEMMA3_1B = LlmConfig(
    vocab_size=262144, width=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
    mlp_dim=6912, rope_base=1_000_000.0, max_seq_len=32768, query_pre_attn_scalar=256.0,
    qk_norm=True, sliding_window=512, sliding_layers=alternating_sliding(26, 6),
    local_rope_base=10_000.0, **_GEMMA)

# Tiny test configs of each family (parity with transformers, decode vs forward): 4 heads
# of 16 = width 64 (Qwen2's HF module derives head_dim from the width); a window of 4
# slots, so sequences of a few tokens already leave it; the query scalar, local RoPE base
# and soft-caps differ from their defaults so that a wrong one shows in the logits (the
# caps are near the logits' own scale here, where tanh is far from the identity).
_TINY = dict(vocab_size=256, width=64, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=16, mlp_dim=128, rope_base=10_000.0, max_seq_len=256)
_TINY_GEMMA = dict(_GEMMA, norm_eps=1e-6, query_pre_attn_scalar=24.0, sliding_window=4)

LLM_TINY_QWEN2 = LlmConfig(**_TINY, attention_bias=True, tie_embeddings=False, norm_eps=1e-6)
LLM_TINY_QWEN3 = LlmConfig(**_TINY, qk_norm=True, norm_eps=1e-6)
LLM_TINY_GEMMA2 = LlmConfig(**_TINY, attn_logit_softcap=1.0, final_logit_softcap=5.0,
                            sliding_layers=alternating_sliding(4, 2), **_TINY_GEMMA)
LLM_TINY_GEMMA3 = LlmConfig(**_TINY, qk_norm=True, sliding_layers=alternating_sliding(4, 3),
                            local_rope_base=100.0, **_TINY_GEMMA)

PRESETS: dict[str, LlmConfig] = {
    "smollm2_135m": SMOLLM2_135M,
    "smollm2_360m": SMOLLM2_360M,
    "smollm2_1_7b": SMOLLM2_1_7B,
    "llama_3_2_1b": LLAMA_3_2_1B,
    "llama_3_2_3b": LLAMA_3_2_3B,
    "qwen2_5_0_5b": QWEN2_5_0_5B,
    "qwen3_0_6b": QWEN3_0_6B,
    "gemma2_2b": GEMMA2_2B,
    "gemma3_270m": GEMMA3_270M,
    "gemma3_1b": GEMMA3_1B,
    "tiny": LLM_TINY,
    "tiny_qwen2": LLM_TINY_QWEN2,
    "tiny_qwen3": LLM_TINY_QWEN3,
    "tiny_gemma2": LLM_TINY_GEMMA2,
    "tiny_gemma3": LLM_TINY_GEMMA3,
}


def get_preset(name: str, **overrides: Any) -> LlmConfig:
  """Returns preset `name` (case-insensitive) with `overrides` applied."""
  key = name.lower().replace("-", "_").replace(".", "_")
  if key not in PRESETS:
    raise KeyError(f"unknown LLM preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
