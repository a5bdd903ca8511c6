"""Soft-prompt merging and answer-only loss masks, as pure functions.

In soft-prompt mode the projected user embeddings (or Perceiver latents) `P` are prepended
to the token embeddings of the prompt `T`: the decoder reads a sequence of length P + T.
Padded user embeddings (history shorter than E) must neither be attended to nor consume RoPE
positions, so the merge also produces the combined attention mask and positions. Everything
here is jit-friendly (static shapes, no Python control flow on values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Re-exported while callers move to `user_llm_jax.llm.losses`, where the loss now lives.


def merge_soft_prompt(soft: jax.Array, soft_mask: jax.Array | None, token_embeds: jax.Array,
                      text_mask: jax.Array | None = None,
                      text_attention_mask: jax.Array | None = None,
                      text_positions: jax.Array | None = None,
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prepends soft-prompt vectors to token embeddings.

  Args:
    soft: [B, P, D] user embeddings already at the LLM width.
    soft_mask: [B, P] bool, True for real embeddings (None: all real). Padding may sit
      anywhere; padded slots are masked out and take no position.
    token_embeds: [B, T, D] embeddings of the text tokens.
    text_mask: [B, T] bool, True for real text tokens (None: all real).
    text_attention_mask: optional [B, T, T] bool text-to-text mask (True = may attend);
      default causal. It is intersected with `text_mask` on the key side.
    text_positions: optional [B, T] positions of the text counted from its first real
      token; they are shifted by the number of real soft slots. Default: from `text_mask`.

  Returns:
    embeds: [B, P+T, D] in `token_embeds.dtype`.
    attention_mask: [B, P+T, P+T] bool: causal over the merged sequence, padded keys
      masked; every query may attend to itself so no row is empty (padded rows are finite
      garbage that no real query reads).
    positions: [B, P+T] int32 RoPE positions counting only real slots (the first real
      slot is 0; padded slots repeat their predecessor's position).
  """
  b, p, d = soft.shape
  bt, t, dt = token_embeds.shape
  if (b, d) != (bt, dt):
    raise ValueError(
        f"soft prompt {soft.shape} and token embeddings {token_embeds.shape} must share "
        "batch and width ([B,P,D] and [B,T,D])")
  soft_mask = jnp.ones((b, p), bool) if soft_mask is None else soft_mask.astype(bool)
  text_mask = jnp.ones((b, t), bool) if text_mask is None else text_mask.astype(bool)
  embeds = jnp.concatenate([soft.astype(token_embeds.dtype), token_embeds], axis=1)
  valid = jnp.concatenate([soft_mask, text_mask], axis=1)  # [B,P+T]
  positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
  if text_positions is not None:
    num_soft = soft_mask.sum(axis=1, dtype=jnp.int32)[:, None]  # [B,1]
    positions = positions.at[:, p:].set(text_positions.astype(jnp.int32) + num_soft)

  n = p + t
  causal = jnp.tril(jnp.ones((n, n), bool))[None]  # [1,S,S]
  mask = causal & valid[:, None, :]  # [B,S,S]
  if text_attention_mask is not None:
    if text_attention_mask.shape != (b, t, t):
      raise ValueError(
          f"text_attention_mask has shape {text_attention_mask.shape}, expected {(b, t, t)}")
    mask = mask.at[:, p:, p:].set(text_attention_mask.astype(bool) & text_mask[:, None, :])
  mask = mask | jnp.eye(n, dtype=bool)[None]
  return embeds, mask, positions.astype(jnp.int32)


def text_positions(text_mask: jax.Array) -> jax.Array:
  """RoPE positions [B,T] int32 for a (left- or right-) padded text mask [B,T]."""
  return jnp.maximum(jnp.cumsum(text_mask.astype(jnp.int32), axis=1) - 1, 0)


def text_attention_mask(text_mask: jax.Array) -> jax.Array:
  """Causal [B,T,T] mask over real tokens; every query also sees itself (no empty rows)."""
  t = text_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  return (causal & text_mask.astype(bool)[:, None, :]) | jnp.eye(t, dtype=bool)[None]


def answer_loss_mask(prompt_lengths: jax.Array, answer_lengths: jax.Array,
                     seq_len: int) -> jax.Array:
  """Marks the answer tokens of right-padded `[prompt; answer; pad]` rows.

  Args:
    prompt_lengths: [B] int, tokens before the answer.
    answer_lengths: [B] int, answer tokens (including any end-of-turn token to learn).
    seq_len: T.

  Returns:
    [B, T] bool, True exactly on positions prompt_len <= t < prompt_len + answer_len.
  """
  t = jnp.arange(seq_len)[None, :]
  start = jnp.asarray(prompt_lengths)[:, None]
  end = start + jnp.asarray(answer_lengths)[:, None]
  return (t >= start) & (t < end)


def prepend_loss_mask(loss_mask: jax.Array, num_prefix: int) -> jax.Array:
  """Extends a [B,T] text loss mask with `num_prefix` False slots for the soft prompt."""
  pad = jnp.zeros((loss_mask.shape[0], num_prefix), bool)
  return jnp.concatenate([pad, loss_mask.astype(bool)], axis=1)
