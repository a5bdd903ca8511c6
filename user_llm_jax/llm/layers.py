"""Building blocks of the decoder: projections, RMSNorm, RoPE, GQA attention, gated MLP.

One set of layers covers Llama, Qwen2.5, Qwen3, Gemma 2 and Gemma 3; `LlmConfig` switches
their differences (biases, q/k norms, (1 + w) norms, sandwich norms, soft-caps, sliding
windows, per-layer RoPE bases). What differs between layers (sliding or global) is looked
up from the layer index at call time, so the same module code runs in a Python loop over
layers (static index) or under a scan over stacked layers (traced index).

Every parameter carries logical axis names (`sharding.partitioned`) and is created without
eager sharding, so a model can be built on one host and placed on a mesh with
`sharding.shard_model`, or initialised directly sharded with `model.create_sharded`.
Parameters are stored in `param_dtype` (float32); activations use the compute `dtype`.
"""

from __future__ import annotations

import functools
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
  """A projection `einsum(eqn, x, kernel)` (+ bias) with a named-axis kernel.

  The kernel's leading `in_ndim` axes are contracted with the input; the rest are outputs
  (and the bias's shape, when there is one). LoRA (`user_llm_jax.llm.lora`) wraps these
  modules without changing the decoder.
  """

  def __init__(self, eqn: str, shape: Sequence[int], names: Sequence[str | None], *,
               in_ndim: int = 1, use_bias: bool = False, dtype: jnp.dtype = jnp.float32,
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
    if use_bias:
      self.bias = nnx.Param(partitioned(nnx.initializers.zeros, names[in_ndim:])(
          rngs.params(), tuple(shape[in_ndim:]), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if hasattr(self, "bias"):
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (as the reference implementations do).

  The output is multiplied by `offset + scale`: Llama/Qwen store the factor itself
  (offset 0, initialised to ones), Gemma stores it minus one (offset 1, zeros).
  """

  def __init__(self, width: int, *, eps: float, offset: float = 0.0,
               names: Sequence[str | None] = ("embed",), dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs  # constant-initialised; kept for a uniform constructor signature
    self.eps = eps
    self.offset = offset
    self.dtype = dtype
    init = nnx.initializers.constant(1.0 - offset)
    self.scale = nnx.Param(partitioned(init, tuple(names))(
        jax.random.key(0), (width,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(var + self.eps)
    if self.offset:
      # Gemma multiplies in float32 and rounds once; Llama rounds before the multiply.
      return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
    return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [H/2] of RoPE, with Llama-3 or linear scaling (float64 numpy)."""
  inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv
  if scaling.rope_type == "linear":
    return inv / scaling.factor
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


def layer_value(values: Sequence, layer: int | jax.Array):
  """`values[layer]`: a Python value for a static index, an array for a traced one."""
  if isinstance(layer, (int, np.integer)):
    return values[int(layer)]
  return jnp.asarray(values)[layer]


def sliding_window_mask(mask: jax.Array, window: int, end_index: jax.Array | int | None,
                        ) -> jax.Array:
  """`mask` [B,T,S] restricted to keys less than `window` slots behind each query.

  Query t sits at slot end_index + t (slot t without a cache). Slots rather than RoPE
  positions: a row's real tokens occupy consecutive slots (left padding only adds masked
  slots before them), so slot distance is token distance, as in Hugging Face's cache.
  """
  t, s = mask.shape[-2], mask.shape[-1]
  q_slot = jnp.arange(t)[:, None] + (0 if end_index is None else end_index)  # [T,1]
  near = q_slot - jnp.arange(s)[None, :] < window                               # [T,S]
  return mask & near


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional per-layer KV cache.

  Optional parts, by `LlmConfig`: q/k/v biases, RMSNorm of each query/key head before
  RoPE, a query scale of its own, tanh soft-capping of the logits, a sliding window and a
  RoPE base of their own on the sliding layers, and an RMSNorm of the output (`post_norm`,
  Gemma's norm after attention, applied before the residual add).
  """

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    bias = dict(use_bias=cfg.attention_bias)
    self.q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), **bias, **kw)
    self.k = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **bias, **kw)
    self.v = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **bias, **kw)
    self.o = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), in_ndim=2, **kw)
    norm_kw = dict(eps=cfg.norm_eps, offset=cfg.norm_scale_offset, **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, names=("head_dim",), **norm_kw)
      self.k_norm = RMSNorm(h, names=("head_dim",), **norm_kw)
    if cfg.post_norms:
      self.post_norm = RMSNorm(d, **norm_kw)
    self.num_kv_heads = k
    self.head_dim = h
    self.rope_layout = cfg.rope_layout
    self.scale = cfg.attention_scale
    self.softcap = cfg.attn_logit_softcap
    self.sliding_window = cfg.sliding_window
    # Static per-layer metadata (tuples, not parameters or array leaves of the module).
    self.sliding = tuple(cfg.is_sliding(i) for i in range(cfg.num_layers))
    self.inv_freq = tuple(rope_inv_freq(h, cfg.rope_base, cfg.rope_scaling).tolist())
    self.local_inv_freq = self.inv_freq
    if cfg.local_rope_base is not None:
      self.local_inv_freq = tuple(rope_inv_freq(h, cfg.local_rope_base, None).tolist())

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
    sliding = layer_value(self.sliding, layer)  # bool, or a traced bool under a scan
    inv_freq = self.inv_freq
    if self.local_inv_freq != self.inv_freq:  # Gemma 3: the sliding layers' own base
      inv_freq = (jnp.where(sliding, jnp.asarray(self.local_inv_freq), jnp.asarray(inv_freq))
                  if isinstance(sliding, jax.Array)
                  else (self.local_inv_freq if sliding else inv_freq))
    q, k, v = self.q(x), self.k(x), self.v(x)  # [B,T,N,H], [B,T,K,H], [B,T,K,H]
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, inv_freq, self.rope_layout)
    k = apply_rope(k, positions, inv_freq, self.rope_layout)
    if self.sliding_window is not None and sliding is not False:
      windowed = sliding_window_mask(mask, self.sliding_window, end_index)
      mask = windowed if sliding is True else jnp.where(sliding, windowed, mask)
    if kv is not None:
      k_all, v_all = kv
      start = (layer, 0, end_index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
      kv = (k_all, v_all)
      k, v = k_all[layer], v_all[layer]  # [B,S,K,H]
    # [B,T,N,H]; a query seeing no slot gets zeros
    out = nn.attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
    out = self.o(out)
    if hasattr(self, "post_norm"):
      out = self.post_norm(out)
    return out, kv


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    # HF's 'gelu_pytorch_tanh': 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class Mlp(nnx.Module):
  """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (gelu_tanh).

  With `post_norms`, an RMSNorm of the output (Gemma's norm after the MLP).
  """

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    d, f = cfg.width, cfg.mlp_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
    self.up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
    self.down = Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **kw)
    self.activation = cfg.mlp_activation
    if cfg.post_norms:
      self.post_norm = RMSNorm(d, eps=cfg.norm_eps, offset=cfg.norm_scale_offset, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.down(_ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))
    if hasattr(self, "post_norm"):
      out = self.post_norm(out)
    return out
