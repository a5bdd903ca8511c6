"""Full-catalogue item scores from the LLM's final hidden state (two-tower on top of the LLM).

The generative path names the next item by decoding a title; this head instead ranks the
whole catalogue, as the encoder's own next-item head (SASRec-style) does, so User-LLM's
Recall@K / NDCG@10 are measured on exactly that protocol (E4SRec and two-tower recommenders
put the same kind of head on an LLM):

    h = final-normed LLM hidden state at the prompt's last token            [B, D]
    q = W h                                                                 [B, F]
    scores = q . item_table^T + bias, PAD and OOV columns -inf              [B, V]

The item table may start from the pretrained encoder's item embeddings (same width F), so
the head begins with the encoder's notion of item similarity. Trained with a full softmax
over the catalogue (catalogues of 10^5+ items would want sampled softmax on accelerators).

With the encoder skip (`UserLlmConfig.item_head_skip`), `UserLLM` adds the encoder's own
next-item scores at the user's last event (its SASRec-style head) to these, and `W` starts
at zero: the head starts as the pretrained encoder's ranking and the LLM learns a
correction to it, instead of learning a ranking from scratch out of a few thousand task
examples (without the skip, 300 steps of the main job leave the head level with popularity
while the encoder's own head is twice as good).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.data import schema
from user_llm_jax.encoder import losses


class ItemHead(nnx.Module):
  """[B, D] LLM states -> float32 [B, V] scores of every catalogue item.

  Args:
    llm_width: D.
    num_items: V, including the reserved PAD and OOV ids (masked in the scores).
    dim: F, the width of the item table.
    rngs: parameter initialisation.
    zero_query: start the query projection `W` at zero (every score starts at the bias;
      with the encoder skip, the head starts as the encoder's own head).
    dtype, param_dtype: compute and storage dtypes.
  """

  def __init__(self, llm_width: int, num_items: int, dim: int, *, rngs: nnx.Rngs,
               zero_query: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    init = nnx.initializers.zeros_init() if zero_query else nnx.initializers.lecun_normal()
    self.query = nnx.Linear(
        llm_width, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=sharding.partitioned(init, ("embed", None)), rngs=rngs)
    self.items = nnx.Param(
        sharding.partitioned(nnx.initializers.normal(0.02), ("vocab", None))(
            rngs.params(), (num_items, dim), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_items,), param_dtype))

  def __call__(self, states: jax.Array) -> jax.Array:
    q = self.query(states)                                                  # [B, F]
    scores = jnp.einsum("bf,vf->bv", q, self.items[...].astype(q.dtype))    # [B, V]
    scores = scores.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return losses.mask_reserved(scores, -jnp.inf)

  def init_items_from(self, table: jax.Array) -> None:
    """Copies a pretrained [V, F] item table (e.g. the encoder's item embeddings)."""
    if tuple(table.shape) != tuple(self.items.shape):
      raise ValueError(f"item table of shape {tuple(table.shape)} does not fit the head's "
                       f"{tuple(self.items.shape)}")
    # A copy: sharing the encoder's buffer would donate one buffer twice in a train step.
    self.items[...] = jnp.array(table, self.items.dtype, copy=True)


def last_prompt_states(hidden: jax.Array, prompt_length: jax.Array) -> jax.Array:
  """hidden [B, T, D], prompt_length [B] -> the state at each prompt's last token [B, D]."""
  last = jnp.clip(jnp.asarray(prompt_length, jnp.int32) - 1, 0, hidden.shape[1] - 1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def item_loss(scores: jax.Array, targets: jax.Array, valid: jax.Array,
              ) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy of the target items over the valid rows; (loss, count)."""
  valid = valid & (targets >= schema.FIRST_ID) & (targets < scores.shape[-1])
  safe = jnp.where(valid, targets, schema.FIRST_ID)
  # PAD/OOV columns are -inf: their probability is exactly 0, never a target.
  logz = jax.nn.logsumexp(scores, axis=-1)
  nll = logz - jnp.take_along_axis(scores, safe[:, None], axis=-1)[:, 0]
  count = valid.sum().astype(jnp.float32)
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1.0), count
