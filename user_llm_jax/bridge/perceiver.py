"""Perceiver resampler: compresses E user-event embeddings to Q learned latents.

Flamingo's resampler: Q learned latent vectors repeatedly attend to the concatenation
[events; latents] (padded events masked), each attention followed by an FFN, both residual,
and a final LayerNorm. The output length Q is fixed (default 16) whatever the history length,
which is what keeps cross-attention and soft-prompt cost independent of E.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.bridge.cross_attention import Attention, FeedForward, layer_norm
from user_llm_jax.sharding import partitioned


class PerceiverLayer(nnx.Module):
  """latents += Attn(LN(latents), LN([events; latents])); latents += FFN(LN(latents))."""

  def __init__(self, width: int, *, num_heads: int, head_dim: int, mlp_dim: int,
               norm_eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    norm = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.latent_norm = layer_norm(width, **norm)
    self.event_norm = layer_norm(width, **norm)
    self.attn = Attention(width, width, num_heads, head_dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = layer_norm(width, **norm)
    self.mlp = FeedForward(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, latents: jax.Array, events: jax.Array, event_mask: jax.Array) -> jax.Array:
    """latents [B,Q,D], events [B,E,D], event_mask [B,E] -> latents [B,Q,D]."""
    q = self.latent_norm(latents)
    kv = jnp.concatenate([self.event_norm(events), q], axis=1)  # [B,E+Q,D]
    # Latents are always valid keys, so every query has something to attend to.
    kv_mask = jnp.concatenate(
        [event_mask, jnp.ones(latents.shape[:2], bool)], axis=1)  # [B,E+Q]
    latents = latents + self.attn(q, kv, kv_mask).astype(latents.dtype)
    latents = latents + self.mlp(self.mlp_norm(latents)).astype(latents.dtype)
    return sharding.with_logical_constraint(latents, sharding.ACT_BQD)


class PerceiverResampler(nnx.Module):
  """Maps [B,E,D] event embeddings (with padding) to [B,Q,D] latents."""

  def __init__(self, width: int, *, num_latents: int = 16, num_layers: int = 2,
               num_heads: int = 4, head_dim: int | None = None, mlp_dim: int | None = None,
               norm_eps: float = 1e-5, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the resampler.

    Args:
      width: D of the event embeddings (and of the latents).
      num_latents: Q, number of output vectors.
      num_layers: number of attention + FFN layers.
      num_heads: attention heads.
      head_dim: per-head width (default: width // num_heads).
      mlp_dim: FFN width (default: 4 * width).
      norm_eps: LayerNorm epsilon.
      dtype: compute dtype.
      param_dtype: storage dtype.
      rngs: random streams (`params`).
    """
    if num_latents < 1 or num_layers < 1:
      raise ValueError(
          f"perceiver needs num_latents >= 1 and num_layers >= 1, got {num_latents}, "
          f"{num_layers}")
    head_dim = head_dim or max(1, width // num_heads)
    mlp_dim = mlp_dim or 4 * width
    self.num_latents, self.dtype = num_latents, dtype
    init = partitioned(nnx.initializers.normal(0.02), ("latents", "embed"))
    self.latents = nnx.Param(init(rngs.params(), (num_latents, width), param_dtype))
    self.layers = nnx.List([
        PerceiverLayer(width, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                       norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = layer_norm(width, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  def __call__(self, events: jax.Array, event_mask: jax.Array | None = None) -> jax.Array:
    """Resamples.

    Args:
      events: [B, E, D] per-event embeddings.
      event_mask: [B, E] bool, True for real events; None means all valid. An example with
        no valid event still gets finite latents (they then only see each other).

    Returns:
      [B, Q, D] latents; all Q of them are valid.
    """
    b = events.shape[0]
    if event_mask is None:
      event_mask = jnp.ones(events.shape[:2], bool)
    if event_mask.shape != events.shape[:2]:
      raise ValueError(
          f"perceiver: event_mask {event_mask.shape} does not match events {events.shape} "
          "(expected [B,E] and [B,E,D])")
    events = events.astype(self.dtype)
    latents = jnp.broadcast_to(self.latents[...].astype(self.dtype)[None],
                               (b, *self.latents.shape))  # [B,Q,D]
    for layer in self.layers:
      latents = layer(latents, events, event_mask)
    return self.final_norm(latents)
