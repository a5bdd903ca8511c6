"""Neural-network primitives shared by the decoder, the user encoder and the bridges."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): bounds x to (-cap, cap) smoothly (Gemma 2); None: x unchanged."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None, softcap: float | None = None) -> jax.Array:
  """Masked softmax attention (`jax.nn.dot_product_attention`, XLA implementation).

  Masked keys get exactly zero weight as soon as a query sees one valid key; a query that
  sees no key at all (a padded slot, a user without history) gets a zero vector, never NaN
  and never a function of the padded values.

  Args:
    q: queries [B,T,N,H].
    k: keys [B,S,K,H]; N must be a multiple of K (grouped-query attention when K < N).
    v: values [B,S,K,H].
    mask: bool, broadcastable to [B,T,S]: True where query t may attend to key s.
    scale: logit scale; default H ** -0.5.
    softcap: if given, logits pass through `soft_cap` before masking (Gemma 2). The fused
      `jax.nn.dot_product_attention` has no such hook, so this computes the same
      softmax attention with explicit einsums.

  Returns:
    [B,T,N,H] in the dtype of `q`. Logits and softmax are computed in float32.
  """
  b, t, n, _ = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if n % kv_heads:
    raise ValueError(f"attention: {n} query heads are not a multiple of {kv_heads} kv heads")
  mask = jnp.broadcast_to(mask.astype(jnp.bool_), (b, t, s))
  # 'xla' rather than the default: arbitrary boolean masks are outside what the cuDNN
  # kernel accepts, and the XLA path keeps the numerics identical across backends.
  if softcap is None:
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                       mask=mask[:, None], scale=scale, implementation="xla")
  else:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv_heads, n // kv_heads, q.shape[-1])            # [B,T,K,G,H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    logits = soft_cap(logits, softcap)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)             # [B,K,G,T,S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(q.dtype)).reshape(q.shape)
  seen = jnp.any(mask, axis=-1)[:, :, None, None]  # [B,T,1,1]
  return jnp.where(seen, out, jnp.zeros((), out.dtype)).astype(q.dtype)
