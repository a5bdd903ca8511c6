"""Causal transformer (Pre-LN by default, Post-LN by option) over event sequences (the user encoder's backbone).

Axis letters: B batch, E events (queries), S events (keys), D width, N heads, H head dim,
F mlp hidden width.

With `EncoderConfig.scan_layers` the blocks are held stacked (`blocks/attn/q_dnh`
[L,D,N,H]) and run by one scan (`user_llm_jax.layer_scan`); every block keeps its
own dropout stream, so the two forms give the same results, dropout included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import layer_scan
from user_llm_jax import nn
from user_llm_jax import sharding
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.sharding import partitioned


def kernel_init(cfg: EncoderConfig, **fan_axes) -> nnx.Initializer:
  """LeCun normal (`cfg.init_std` 0), or normal(`cfg.init_std`) as BERT and SASRec do.

  `fan_axes` (in_axis, out_axis) tell LeCun's fan-in for multi-axis kernels.
  """
  if cfg.init_std:
    return nnx.initializers.normal(cfg.init_std)
  return nnx.initializers.lecun_normal(**fan_axes)


def dense(in_dim: int, out_dim: int, in_axis: str, out_axis: str, cfg: EncoderConfig, *,
          rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  """A Linear layer with logical axis names on its kernel and bias."""
  return nnx.Linear(
      in_dim, out_dim, use_bias=use_bias,
      kernel_init=partitioned(kernel_init(cfg), (in_axis, out_axis)),
      bias_init=partitioned(nnx.initializers.zeros_init(), (out_axis,)),
      dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def layer_norm(cfg: EncoderConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      cfg.width, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
      bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)


def attention_mask(mask: jax.Array) -> jax.Array:
  """Causal mask restricted to valid keys.

  Args:
    mask: bool[B, E] valid event positions.

  Returns:
    bool[B, E, S]: query e may read key s iff s <= e and s is valid.
  """
  length = mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [E, S]
  return causal[None, :, :] & mask[:, None, :]


class Attention(nnx.Module):
  """Multi-head self-attention with an explicit boolean mask."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    init = kernel_init(cfg, in_axis=0, out_axis=(1, 2))
    d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
    shape_dnh = (d, n, h)
    self.q_dnh = nnx.Param(partitioned(init, ("embed", "heads", "head_dim"))(
        rngs.params(), shape_dnh, cfg.param_dtype))
    self.k_dnh = nnx.Param(partitioned(init, ("embed", "heads", "head_dim"))(
        rngs.params(), shape_dnh, cfg.param_dtype))
    self.v_dnh = nnx.Param(partitioned(init, ("embed", "heads", "head_dim"))(
        rngs.params(), shape_dnh, cfg.param_dtype))
    out_init = kernel_init(cfg, in_axis=(0, 1), out_axis=2)
    self.o_nhd = nnx.Param(partitioned(out_init, ("heads", "head_dim", "embed"))(
        rngs.params(), (n, h, d), cfg.param_dtype))
    self.dtype = cfg.dtype
    self.scale = h ** -0.5
    # Holds no RNG stream of its own (one would shift the parameters drawn after it): the
    # block lends its dropout stream at each call.
    self.weight_dropout = (nnx.Dropout(cfg.attention_dropout) if cfg.attention_dropout
                           else None)

  def __call__(self, x: jax.Array, mask_bes: jax.Array, *, deterministic: bool = True,
               rngs: nnx.RngStream | None = None) -> jax.Array:
    """Attends `x` [B, E, D] under `mask_bes` [B, E, S]; `rngs` draws the attention-weight
    dropout (`cfg.attention_dropout`, training only)."""
    x = x.astype(self.dtype)
    q = jnp.einsum("BED,DNH->BENH", x, self.q_dnh[...].astype(self.dtype))  # [B, E, N, H]
    k = jnp.einsum("BSD,DNH->BSNH", x, self.k_dnh[...].astype(self.dtype))  # [B, S, N, H]
    v = jnp.einsum("BSD,DNH->BSNH", x, self.v_dnh[...].astype(self.dtype))  # [B, S, N, H]
    if self.weight_dropout is not None and not deterministic:
      out = self._dropped_attention(q, k, v, mask_bes, rngs)
    else:
      # A query with no valid key (an all-padding row) gets zeros, never NaN.
      out = nn.attention(q, k, v, mask_bes, scale=self.scale)           # [B, E, N, H]
    return jnp.einsum("BENH,NHD->BED", out, self.o_nhd[...].astype(self.dtype))

  def _dropped_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         mask_bes: jax.Array, rngs: nnx.RngStream | None) -> jax.Array:
    """`nn.attention` with dropout on the attention weights (training only)."""
    logits = jnp.einsum("BENH,BSNH->BNES", q, k,
                        preferred_element_type=jnp.float32) * self.scale
    logits = jnp.where(mask_bes[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)                           # [B, N, E, S]
    weights = self.weight_dropout(weights, deterministic=False, rngs=rngs).astype(self.dtype)
    out = jnp.einsum("BNES,BSNH->BENH", weights, v)
    seen = jnp.any(mask_bes, axis=-1)[:, :, None, None]                 # [B, E, 1, 1]
    return jnp.where(seen, out, jnp.zeros((), out.dtype))


class Mlp(nnx.Module):
  """Position-wise feed-forward block D -> F -> D with GELU."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.up = dense(cfg.width, cfg.mlp_dim, "embed", "mlp", cfg, rngs=rngs)
    self.down = dense(cfg.mlp_dim, cfg.width, "mlp", "embed", cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))  # [B, E, F] -> [B, E, D]


class Block(nnx.Module):
  """Transformer block. Pre-LN (`cfg.norm_position` 'pre'): x + Attn(LN(x)), then
  x + Mlp(LN(x)). Post-LN ('post'): LN(x + Attn(x)), then LN(x + Mlp(x))."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = layer_norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layer_norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.post_norm = cfg.norm_position == "post"

  def __call__(self, x: jax.Array, mask_bes: jax.Array, *, deterministic: bool) -> jax.Array:
    if self.post_norm:
      h = self.attn(x, mask_bes, deterministic=deterministic, rngs=self.dropout.rngs)
      x = self.attn_norm(x + self.dropout(h, deterministic=deterministic))
      h = self.mlp(x)
      x = self.mlp_norm(x + self.dropout(h, deterministic=deterministic))
      return sharding.with_logical_constraint(x, sharding.ACT_BTD)
    h = self.attn(self.attn_norm(x), mask_bes, deterministic=deterministic,
                  rngs=self.dropout.rngs)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x))
    x = x + self.dropout(h, deterministic=deterministic)
    return sharding.with_logical_constraint(x, sharding.ACT_BTD)


class CausalTransformer(nnx.Module):
  """Learned positions + a stack of causal blocks over [B, E, D] event states."""

  def __init__(self, cfg: EncoderConfig, num_layers: int, *, rngs: nnx.Rngs):
    self.positions = nnx.Param(partitioned(nnx.initializers.normal(0.02), ("length", "embed"))(
        rngs.params(), (cfg.max_len, cfg.width), cfg.param_dtype))
    self.input_norm = layer_norm(cfg, rngs=rngs) if cfg.input_norm else None
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    blocks = [Block(cfg, rngs=rngs) for _ in range(num_layers)]
    self.blocks = layer_scan.stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.remat_policy = cfg.remat_policy
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
    """Encodes events causally.

    Args:
      x: [B, E, D] event embeddings (E <= max_len).
      mask: bool[B, E] valid positions.
      deterministic: disable dropout.

    Returns:
      [B, E, D] states; position e depends only on valid events 0..e.
    """
    length = x.shape[1]
    x = x.astype(self.dtype) + self.positions[...][:length].astype(self.dtype)[None]
    if self.input_norm is not None:
      x = self.input_norm(x)
    x = self.dropout(x, deterministic=deterministic)
    x = sharding.with_logical_constraint(x, sharding.ACT_BTD)
    mask_bes = attention_mask(mask)

    def step(block: Block, h: jax.Array, *_) -> jax.Array:
      return block(h, mask_bes, deterministic=deterministic)

    if not isinstance(self.blocks, nnx.List):  # stacked: one scan over the blocks
      return layer_scan.scan(self.blocks, step, x, remat_policy=self.remat_policy)
    step = layer_scan.remat(step, self.remat_policy)
    for block in self.blocks:
      x = step(block, x)
    return x
