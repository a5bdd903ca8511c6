"""Next-token losses of a decoder's logits (shared by User-LLM, the text baseline, tasks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """-log p(tokens[:, t] | tokens[:, :t]) for t >= 1: float32 [B, T-1].

  Args:
    logits: [B, T, V]; position t predicts token t + 1.
    tokens: [B, T] int.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B,T-1,V]
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits: jax.Array, tokens: jax.Array,
                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over the tokens marked in `loss_mask`.

  `loss_mask[b, t]` says token `t` is a target (an answer token); it is predicted from the
  logits at `t - 1`, so position 0 can never be a target.

  Args:
    logits: [B, T, V].
    tokens: [B, T] int.
    loss_mask: [B, T] bool.

  Returns:
    (loss, num_targets): scalar float32 mean, and the number of target tokens. When no
    token is a target the loss is exactly 0 with zero gradients (never NaN).
  """
  nll = next_token_nll(logits, tokens)  # [B,T-1]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  count = weights.sum()
  # where() rather than a division by max(count, 1) alone: keeps the all-masked case at an
  # exact 0 whatever the (masked) per-token losses are.
  total = jnp.sum(jnp.where(weights > 0, nll, 0.0))
  loss = total / jnp.maximum(count, 1.0)
  return loss, count
