"""Flamingo-style gated cross-attention from text tokens to user embeddings.

A block computes

    x = x + tanh(a) * XAttn(LN(x), LN(U))
    x = x + tanh(b) * FFN(LN(x))

with scalar gates `a`, `b` initialised to zero, so inserting blocks into a pretrained decoder
leaves its logits bit-identical at step 0 (`x + 0 * y == x` for finite `y`). Text tokens attend
to every valid user embedding of their own example: there is no causal mask over user
embeddings, and padded embeddings get exactly zero attention weight.

The blocks live in `Decoder.cross_attention` (an `nnx.Dict` keyed by the decoder layer index
they run before), so the decoder is never forked; `insert_cross_attention` fills it.

The keys/values of a block depend on the user context alone (`context_kv`: LN(U) @ W_k,
LN(U) @ W_v). When decoding, `Decoder.precompute_context` computes them once per prompt and
the blocks take them through `context_kv=` at every generated token and for every beam.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import nn
from user_llm_jax import sharding
from user_llm_jax.sharding import partitioned


def _dense_init(in_axis, out_axis):
  """Fan-in scaled truncated normal for multi-axis kernels (LeCun normal)."""
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def layer_norm(width: int, *, eps: float, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the model width with partitioned scale and bias."""
  return nnx.LayerNorm(
      width, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
      bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs)


class Attention(nnx.Module):
  """Multi-head attention of queries `x` over keys/values computed from `context`."""

  def __init__(self, width: int, context_width: int, num_heads: int, head_dim: int, *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the projections.

    Args:
      width: query stream width D.
      context_width: key/value stream width (D of the context).
      num_heads: N, used for queries, keys and values alike.
      head_dim: H.
      dtype: compute dtype.
      param_dtype: storage dtype of the kernels.
      rngs: random streams (`params`).
    """
    self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
    in_init = partitioned(_dense_init(0, (1, 2)), ("embed", "heads", "head_dim"))
    out_init = partitioned(_dense_init((0, 1), 2), ("heads", "head_dim", "embed"))
    self.q_proj = nnx.Param(in_init(rngs.params(), (width, num_heads, head_dim), param_dtype))
    self.k_proj = nnx.Param(
        in_init(rngs.params(), (context_width, num_heads, head_dim), param_dtype))
    self.v_proj = nnx.Param(
        in_init(rngs.params(), (context_width, num_heads, head_dim), param_dtype))
    self.o_proj = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, width), param_dtype))

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values of the context: [B,S,C] -> (k [B,S,N,H], v [B,S,N,H]).

    They depend on the context alone, so a decoder computes them once per prompt and
    reuses them at every generated token (see `Decoder.precompute_context`).
    """
    context = context.astype(self.dtype)
    k = jnp.einsum("BSD,DNH->BSNH", context, self.k_proj[...].astype(self.dtype))
    v = jnp.einsum("BSD,DNH->BSNH", context, self.v_proj[...].astype(self.dtype))
    return k, v

  def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array, *,
               context_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """x [B,T,D] attends to context [B,S,C] (or its precomputed keys/values) -> [B,T,D].

    Args:
      x: queries [B, T, D].
      context: [B, S, C], or None when `context_kv` is given.
      context_mask: [B, S] bool, True for keys that may be attended.
      context_kv: `context_kv(context)` computed earlier; used instead of `context`.
    """
    x = x.astype(self.dtype)
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(self.dtype))
    if context_kv is None:
      if context is None:
        raise ValueError("cross-attention needs `context` or `context_kv`")
      context_kv = self.context_kv(context)
    k, v = (t.astype(self.dtype) for t in context_kv)  # [B,S,N,H] each
    # No causal mask over user embeddings; padded ones get exactly zero weight, and a text
    # token whose example has no valid embedding gets zeros (not NaN).
    out = nn.attention(q, k, v, context_mask[:, None, :])  # [B,T,N,H]
    return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(self.dtype))


class FeedForward(nnx.Module):
  """Two-layer GELU MLP D -> F -> D."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.up = nnx.Param(partitioned(_dense_init(0, 1), ("embed", "mlp"))(
        rngs.params(), (width, mlp_dim), param_dtype))
    self.down = nnx.Param(partitioned(_dense_init(0, 1), ("mlp", "embed"))(
        rngs.params(), (mlp_dim, width), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> [B,T,D]."""
    h = jnp.einsum("BTD,DF->BTF", x.astype(self.dtype), self.up[...].astype(self.dtype))
    h = sharding.with_logical_constraint(jax.nn.gelu(h), sharding.ACT_BTF)
    return jnp.einsum("BTF,FD->BTD", h, self.down[...].astype(self.dtype))


class GatedCrossAttention(nnx.Module):
  """Gated cross-attention + gated FFN block with zero-initialised tanh gates."""

  def __init__(self, width: int, *, context_width: int | None = None, num_heads: int,
               head_dim: int, mlp_dim: int, norm_eps: float = 1e-5,
               gate_init: float = 0.0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds one block.

    Args:
      width: decoder width D (the residual stream this block writes to).
      context_width: width of the user embeddings; defaults to `width`.
      num_heads: N attention heads.
      head_dim: H per head.
      mlp_dim: F, hidden width of the gated FFN.
      norm_eps: LayerNorm epsilon.
      gate_init: initial value of both gates; 0 keeps the host LLM unchanged at step 0.
      dtype: compute dtype.
      param_dtype: storage dtype.
      rngs: random streams (`params`).
    """
    context_width = context_width or width
    self.dtype = dtype
    norm = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layer_norm(width, **norm)
    self.context_norm = layer_norm(context_width, **norm)
    self.attn = Attention(width, context_width, num_heads, head_dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = layer_norm(width, **norm)
    self.mlp = FeedForward(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    gate = partitioned(nnx.initializers.constant(gate_init), ())
    self.attn_gate = nnx.Param(gate(rngs.params(), (), param_dtype))
    self.mlp_gate = nnx.Param(gate(rngs.params(), (), param_dtype))

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys/values of this block for user embeddings [B,E,C] -> ([B,E,N,H], [B,E,N,H]).

    Applies the block's context LayerNorm, then the key/value projections: everything of
    the block that depends on the context alone, computed once per prompt when decoding.
    """
    return self.attn.context_kv(self.context_norm(context))

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, *,
               context_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: text hidden states [B, T, D].
      context: user embeddings [B, E, C] (events or Perceiver latents); may be None when
        `context_kv` is given.
      context_mask: [B, E] bool, True for real embeddings; None means all valid.
      context_kv: `self.context_kv(context)` computed earlier (k, v [B, E, N, H]); the
        result is the same as passing `context`, without re-projecting it.

    Returns:
      Updated hidden states [B, T, D] in `x.dtype`.
    """
    if context_kv is not None:
      events = context_kv[0].shape[:2]
    elif context is not None:
      events = context.shape[:2]
    else:
      raise ValueError("cross-attention needs `context` [B,E,C] or `context_kv`")
    if context_mask is None:
      context_mask = jnp.ones(events, bool)
    if events[0] != x.shape[0] or context_mask.shape != events:
      raise ValueError(
          f"cross-attention: text {x.shape}, context {events} (batch, events) and "
          f"context_mask {context_mask.shape} must share the batch and event axes "
          "([B,T,D], [B,E,...], [B,E])")
    if context_kv is None:
      context_kv = self.context_kv(context)
    attn = self.attn(self.attn_norm(x), None, context_mask, context_kv=context_kv)  # [B,T,D]
    gate_a = jnp.tanh(self.attn_gate[...]).astype(x.dtype)
    x = x + gate_a * attn.astype(x.dtype)
    ffn = self.mlp(self.mlp_norm(x))  # [B,T,D]
    gate_b = jnp.tanh(self.mlp_gate[...]).astype(x.dtype)
    x = x + gate_b * ffn.astype(x.dtype)
    return sharding.with_logical_constraint(x, sharding.ACT_BTD)


def cross_attention_layers(num_layers: int, every_k: int, first: int = 0) -> tuple[int, ...]:
  """Decoder layer indices that get a block before them: first, first + k, ... < num_layers.

  Blocks only in the upper layers (`first` > 0) also make training cheaper: no gradient
  has to flow through the frozen layers below the first block.
  """
  if every_k < 1:
    raise ValueError(f"xattn every_k must be >= 1, got {every_k}")
  if not 0 <= first < num_layers:
    raise ValueError(f"xattn first layer must be in [0, {num_layers}), got {first}")
  return tuple(range(first, num_layers, every_k))


def insert_cross_attention(decoder: nnx.Module, every_k: int = 5, *, rngs: nnx.Rngs,
                           context_width: int | None = None, num_heads: int | None = None,
                           head_dim: int | None = None, mlp_dim: int | None = None,
                           gate_init: float = 0.0, dtype: Any = None,
                           param_dtype: Any = jnp.float32, first: int = 0) -> tuple[int, ...]:
  """Puts a `GatedCrossAttention` block before every `every_k`-th layer of `decoder`.

  The block stored under key `str(i)` of `decoder.cross_attention` runs before decoder layer
  `i` (the decoder's contract). With the default k=5 a 30-layer LLM gets 6 blocks, before
  layers 0, 5, ..., 25. Sizes default to the decoder's own (width, query heads, head dim,
  MLP width), so a block costs about as much as a decoder layer.

  Args:
    decoder: a `user_llm_jax.llm.model.Decoder` (anything with `.cfg` and an
      `nnx.Dict` named `cross_attention`).
    every_k: spacing of the blocks in decoder layers.
    rngs: random streams for the new parameters.
    context_width: width of the user embeddings fed to the blocks (default: decoder width).
    num_heads: attention heads (default: decoder query heads).
    head_dim: per-head width (default: decoder head dim).
    mlp_dim: FFN width (default: decoder MLP width).
    gate_init: initial tanh-gate pre-activation; 0 keeps the LLM unchanged.
    dtype: compute dtype (default: the decoder's).
    param_dtype: storage dtype.
    first: the first layer with a block (0: from the bottom).

  Returns:
    The layer indices that received a block.

  Raises:
    ValueError: if the decoder already holds cross-attention blocks or `every_k` < 1.
  """
  cfg = decoder.cfg
  if len(decoder.cross_attention):
    raise ValueError(
        f"decoder already has cross-attention blocks at {sorted(decoder.cross_attention)}")
  layers = cross_attention_layers(cfg.num_layers, every_k, first)
  for i in layers:
    decoder.cross_attention[str(i)] = GatedCrossAttention(
        cfg.width, context_width=context_width, num_heads=num_heads or cfg.num_heads,
        head_dim=head_dim or cfg.head_dim, mlp_dim=mlp_dim or cfg.mlp_dim,
        norm_eps=cfg.norm_eps, gate_init=gate_init, dtype=dtype or cfg.compute_dtype,
        param_dtype=param_dtype, rngs=rngs)
  return layers
