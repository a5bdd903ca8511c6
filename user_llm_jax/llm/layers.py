"""Building blocks of the Llama-family decoder: projections, RMSNorm, RoPE, GQA attention, SwiGLU.

Every parameter carries logical axis names (`sharding.partitioned`) and is created without
eager sharding, so a model can be built on one host and placed on a mesh with
`sharding.shard_model`, or initialised directly sharded with `model.create_sharded`.
Parameters are stored in `param_dtype` (float32); activations use the compute `dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax import nn
from user_llm_jax.llm.config import LlmConfig, RopeScaling
from user_llm_jax.sharding import partitioned


def _parse_eqn(eqn: str) -> tuple[str, str, str]:
  lhs, out = eqn.replace(" ", "").split("->")
  x, w = lhs.split(",")
  return x, w, out


class Einsum(nnx.Module):
  """A bias-free projection `einsum(eqn, x, kernel)` with a named-axis kernel.

  The kernel's leading `in_ndim` axes are contracted with the input; the rest are outputs.
  LoRA (`user_llm_jax.llm.lora`) wraps these modules without changing the decoder.
  """

  def __init__(self, eqn: str, shape: Sequence[int], names: Sequence[str | None], *,
               in_ndim: int = 1, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    _, w, _ = _parse_eqn(eqn)
    if len(w) != len(shape) or len(shape) != len(names):
      raise ValueError(f"einsum {eqn!r}: kernel spec {w!r}, shape {tuple(shape)} and names "
                       f"{tuple(names)} must have the same rank")
    self.eqn = eqn
    self.in_ndim = in_ndim
    self.dtype = dtype
    fan_in = int(np.prod(shape[:in_ndim]))
    init = nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    self.kernel = nnx.Param(partitioned(init, names)(rngs.params(), tuple(shape), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (as the reference implementation does)."""

  def __init__(self, width: int, *, eps: float, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs  # ones-initialised; kept for a uniform constructor signature
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(partitioned(nnx.initializers.ones, ("embed",))(
        jax.random.key(0), (width,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return y * self.scale[...].astype(self.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [H/2] of RoPE, with Llama-3 scaling when given (float64 numpy)."""
  inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: Sequence[float] | np.ndarray,
               layout: str) -> jax.Array:
  """Rotates `x` [B,T,N,H] by angle position * inv_freq, in float32.

  Args:
    x: queries or keys [B,T,N,H].
    positions: [B,T] int positions (per row, so left-padded batches work).
    inv_freq: [H/2] inverse frequencies.
    layout: 'rotate_half' pairs dims (i, i+H/2) (Hugging Face); 'interleaved' pairs
      (2i, 2i+1) (original Llama and llama.cpp's permuted q/k rows).

  Returns:
    The rotated array, same shape and dtype as `x`.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  sin = jnp.sin(angles)[:, :, None, :]  # [B,T,1,H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  if layout == "rotate_half":
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif layout == "interleaved":
    pairs = x32.reshape(*x32.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x32.shape)
  else:
    raise ValueError(f"unknown rope layout {layout!r}")
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), **kw)
    self.k = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
    self.o = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), in_ndim=2, **kw)
    self.num_kv_heads = k
    self.head_dim = h
    self.rope_layout = cfg.rope_layout
    # A tuple of floats (static metadata, not a parameter or array leaf of the module).
    self.inv_freq = tuple(rope_inv_freq(h, cfg.rope_base, cfg.rope_scaling).tolist())

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None,
               end_index: jax.Array | None = None, layer: int = 0,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends from x [B,T,D] to its own keys, or to the KV cache when given.

    Args:
      x: [B,T,D] inputs.
      positions: [B,T] RoPE positions.
      mask: [B,T,S] True where query t may attend to key slot s.
      kv: the whole stacked cache ([L,B,S,K,H] keys, values) or None.
      end_index: first cache slot written by this call.
      layer: which layer of the stacked cache is this one's.

    Returns:
      The output [B,T,D] and the updated stacked cache (None without a cache). Only the T
      new slots of this layer are written (in place when the caller donates the cache).
    """
    q = apply_rope(self.q(x), positions, self.inv_freq, self.rope_layout)  # [B,T,N,H]
    k = apply_rope(self.k(x), positions, self.inv_freq, self.rope_layout)  # [B,T,K,H]
    v = self.v(x)                                                           # [B,T,K,H]
    if kv is not None:
      k_all, v_all = kv
      start = (layer, 0, end_index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
      kv = (k_all, v_all)
      k, v = k_all[layer], v_all[layer]  # [B,S,K,H]
    out = nn.attention(q, k, v, mask)  # [B,T,N,H]; a query seeing no slot gets zeros
    return self.o(out), kv


class Mlp(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    d, f = cfg.width, cfg.mlp_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
    self.up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
    self.down = Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
