"""Neural-network primitives shared by the decoder, the user encoder and the bridges."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None) -> jax.Array:
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
  out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                     mask=mask[:, None], scale=scale, implementation="xla")
  seen = jnp.any(mask, axis=-1)[:, :, None, None]  # [B,T,1,1]
  return jnp.where(seen, out, jnp.zeros((), out.dtype)).astype(q.dtype)
