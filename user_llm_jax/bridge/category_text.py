"""The text of each event's categories, in the LLM's own token-embedding space.

The encoder reads an event's categories as ids: a genre, a product category, or (Amazon,
`data.text_categories`) a summary the user wrote more than once. The LLM must then learn,
from a few thousand task examples, which words an id stands for before it can say them
(the review task's answer is often exactly such a summary, and the favorite-genre answer
is a genre name). A text prompt has it for free: the words are in its context.

With `UserLlmConfig.category_text`, every category name is tokenized once and the mean of
the LLM's input embeddings of its tokens, scaled to unit RMS, is a fixed row of a
[num_categories, D] table (`CategoryText`, not trained). Each event's user embedding then
gets the mean of its categories' rows, times a learned per-dimension gain starting at 1:

    context[b, e] = projection(state[b, e]) + gain * mean_c table[category[b, e, c]]

SmolLM2 ties its input and output embeddings, so a cross-attention block that passes such a
row on to the residual stream raises exactly the logits of those words.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax.data import schema
from user_llm_jax.data import text_categories

PAD_TOKEN = -1  # marks the unused slots of a name's token row


class CategoryText(nnx.Variable):
  """Fixed [num_categories, D] text vectors of the category names (not a `Param`)."""


def token_table(names: Sequence[str], tokenizer, max_tokens: int) -> np.ndarray:
  """int32[len(names), max_tokens] token ids of every category name, `PAD_TOKEN`-padded.

  Reserved ids (PAD, OOV) and names without tokens get an all-`PAD_TOKEN` row (a zero
  text vector). Names longer than `max_tokens` keep their first tokens.

  Args:
    names: the vocabulary's category names, indexed by category id.
    tokenizer: anything with `encode(text, add_bos=False) -> list[int]`.
    max_tokens: L >= 1.
  """
  if max_tokens < 1:
    raise ValueError(f"category text needs max_tokens >= 1, got {max_tokens}")
  table = np.full((len(names), max_tokens), PAD_TOKEN, np.int32)
  for i, name in enumerate(names):
    if i < schema.FIRST_ID:
      continue
    # As the task answers are written (`TaskExample.answer_tokens`): no leading space.
    ids = tokenizer.encode(text_categories.category_words(name).strip(),
                           add_bos=False)[:max_tokens]
    table[i, :len(ids)] = ids
  return table


def text_vectors(embedding: jax.Array, tokens: np.ndarray | jax.Array) -> jax.Array:
  """float32 [V_cat, D]: each row the mean of its tokens' embeddings at unit RMS (rows
  without tokens are 0).

  Args:
    embedding: [vocab, D] the LLM's input token embeddings.
    tokens: int[V_cat, L] from `token_table`.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  valid = (tokens != PAD_TOKEN).astype(jnp.float32)[..., None]            # [V, L, 1]
  rows = jnp.take(embedding.astype(jnp.float32), jnp.maximum(tokens, 0), axis=0)
  mean = jnp.sum(rows * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)  # [V, D]
  rms = jnp.sqrt(jnp.mean(jnp.square(mean), axis=-1, keepdims=True))
  return mean / jnp.maximum(rms, 1e-12)  # a row without tokens stays 0


def event_text(table: jax.Array, categories: jax.Array) -> jax.Array:
  """[B, E, D]: the mean of each event's categories' rows (PAD / OOV slots ignored; an
  event without a real category gets 0).

  Args:
    table: [V_cat, D] `text_vectors`.
    categories: int[B, E, C] category ids.
  """
  categories = jnp.asarray(categories, jnp.int32)
  valid = (categories >= schema.FIRST_ID).astype(table.dtype)[..., None]  # [B, E, C, 1]
  rows = jnp.take(table, categories, axis=0, mode="clip")                 # [B, E, C, D]
  return jnp.sum(rows * valid, axis=2) / jnp.maximum(jnp.sum(valid, axis=2), 1.0)


# ------------------------------------------------------------------ token-level memory
#
# The mean above is a bag of words: it raises the logits of a summary's words but says
# nothing of their order, and a user's own phrase ("Came on time.") keeps a probability of
# about e^-14.6 with it (README, Gift_Cards). A text prompt copies such a phrase with the
# attention its LLM was pretrained with. With `UserLlmConfig.text_memory` the cross-
# attention also reads each event's summary token by token, one memory slot per token:
#
#     slot[b, e, j] = t[j] + roll(t[j - 1]) + g * rms1(context[b, e])
#
# t[j] the j-th token's input embedding at unit RMS (what a slot's value should write out:
# the LLM ties its input and output embeddings), t[-1] a learned start vector, roll a
# fixed half-width cyclic shift of the dimensions, so the previous token lands where a
# key projection can read it apart from the current one (a query holding the token just
# written then finds the slot of the token that followed it: copying, one block deep),
# and the event's own user embedding at unit RMS times a learned gain g, so a query can
# pick the event (its rating, its time) before the phrase.


class MemoryTokens(nnx.Variable):
  """Fixed int32 [num_categories, L] token ids of the category names (`token_table`; the
  copy head's view of the memory slots; not a `Param`)."""


def memory_token_ids(tokens: jax.Array, categories: jax.Array) -> jax.Array:
  """int32 [B, E*L]: the token of every memory slot (`memory_slots`' order; `PAD_TOKEN`
  where a name has no token).

  Args:
    tokens: int[V_cat, L] `token_table`.
    categories: int[B, E, C] the events' category ids (the first is read).
  """
  first = jnp.asarray(categories, jnp.int32)[..., 0]
  ids = jnp.take(jnp.asarray(tokens, jnp.int32), first, axis=0, mode="clip")  # [B,E,L]
  return ids.reshape(ids.shape[0], -1)


class TextMemory(nnx.Variable):
  """Fixed [num_categories, L, D] unit-RMS token embeddings of the category names (not a
  `Param`; PAD slots are 0)."""


def token_vectors(embedding: jax.Array, tokens: np.ndarray | jax.Array) -> jax.Array:
  """float32 [V_cat, L, D]: each name token's input embedding at unit RMS (PAD slots 0).

  Args:
    embedding: [vocab, D] the LLM's input token embeddings.
    tokens: int[V_cat, L] from `token_table`.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  rows = jnp.take(embedding.astype(jnp.float32), jnp.maximum(tokens, 0), axis=0)
  rms = jnp.sqrt(jnp.mean(jnp.square(rows), axis=-1, keepdims=True))
  valid = (tokens != PAD_TOKEN).astype(jnp.float32)[..., None]
  return rows / jnp.maximum(rms, 1e-12) * valid


def memory_slots(table: jax.Array, categories: jax.Array, events: jax.Array,
                 event_mask: jax.Array, start: jax.Array,
                 event_gain: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token-level memory of each event's first category name -> ([B, E*L, D], [B, E*L]).

  The first category is the one `data.text_categories` puts the review summary in.

  Args:
    table: [V_cat, L, D] `token_vectors`.
    categories: int[B, E, C] the events' category ids.
    events: [B, E, D] the events' user embeddings (the bridge's output).
    event_mask: [B, E] bool, True on real events.
    start: [D] the "previous token" of every name's first token.
    event_gain: scalar g of the event embedding in every slot of its event.
  """
  first = jnp.asarray(categories, jnp.int32)[..., 0]                          # [B,E]
  cur = jnp.take(table, first, axis=0, mode="clip")                           # [B,E,L,D]
  b, e, length, d = cur.shape
  token_valid = jnp.any(cur != 0, axis=-1)                                    # [B,E,L]
  prev = jnp.concatenate(
      [jnp.broadcast_to(start.astype(cur.dtype), (b, e, 1, d)), cur[:, :, :-1]], axis=2)
  x = events.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
  slots = (cur + jnp.roll(prev, d // 2, axis=-1)
           + event_gain.astype(cur.dtype) * x[:, :, None, :])
  mask = (token_valid & (first >= schema.FIRST_ID)[..., None]
          & jnp.asarray(event_mask, bool)[..., None])
  return slots.reshape(b, e * length, d), mask.reshape(b, e * length)
