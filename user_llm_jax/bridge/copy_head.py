"""A pointer (copy) head: the LLM's next-token distribution mixed with copies from the
token memory of the user's events.

With `UserLlmConfig.text_memory`, every event's summary sits in the cross-attention
context token by token (`category_text.memory_slots`), yet a cross-attention block must
learn to copy a phrase through the LLM's upper layers, where a query no longer holds the
token just written; in 200 steps SmolLM2 does not (README, Gift_Cards). A text prompt
copies with the attention its LLM was pretrained with. The copy head (See et al.'s
pointer-generator, 2017, on the memory slots) gives User-LLM that path at the output:

    a[t, s]  = softmax_s( q[t] . k[s] / sqrt(D) ),  with a learned null slot s = 0
    q[t]     = rms1(emb(lower(token[t]))) + Wh hidden[t] / D
    k[s]     = roll(slot[s], -D/2)
    g[t]     = sigmoid(w . hidden[t] / sqrt(D) + b)        (b: `copy_gate`)
    p(v | t) = (1 - g[t] (1 - a[t, 0])) p_llm(v | t)
               + g[t] sum_{s >= 1: id[s] = lower(v)} a[t, s] p_llm(v | t) / p_llm(lower(v) | t)

where p_llm(c | t) sums the LLM's probability over the tokens whose lowercase form is c.

`slot[s]` is the memory slot (its token's embedding, the previous token's rolled half the
width along, and its event's embedding; the score is also times a learned scale), `id[s]`
its token. The head is copy-ready from the start: the slot rolled back puts its previous
token where the query holds the token just read, so the query matches the slots that
token precedes, and the mixture offers their tokens (the phrase's continuation); the
learned start vector of a name's first slot starts as the embedding of the prompt's last
token, so the first words are offered too. `Wh` starts at 0 and learns which event and
which phrase to follow; the null slot takes the attention where nothing matches, which
switches the copy off. The summaries are
lowercased category names, so the query reads the lowercase form of the token
(`lowercase_table`), and a copied token's mass goes to its cased forms as the LLM weighs
them: a user who writes "Came on time." still matches "came on time.", and the copy
writes "Came" where the LLM would capitalise.
The output is a log-probability per token ("logits" whose softmax is the mixture), so
every sampler, beam search and scorer reads it unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax import sharding

# Copied probabilities at or below this count as none (their log, and its gradient 1/p,
# stay finite in float32).
_FLOOR = 1e-30


class TokenMap(nnx.Variable):
  """Fixed int32 [vocab] table: each token's lowercase form (not a `Param`)."""


def lowercase_table(tokenizer, vocab_size: int) -> np.ndarray:
  """int32[vocab_size]: the id of each token's lowercase text when that is one token,
  else the token itself.

  Args:
    tokenizer: anything with `decode(list[int]) -> str` and
      `encode(text, add_bos=False) -> list[int]`.
    vocab_size: rows of the table (the LLM's embedding rows; ids the tokenizer does not
      know map to themselves).
  """
  table = np.arange(vocab_size, dtype=np.int32)
  size = min(vocab_size, int(getattr(tokenizer, "vocab_size", vocab_size)))
  for token in range(size):
    text = tokenizer.decode([token])
    lower = text.lower()
    if not text or lower == text:
      continue
    ids = tokenizer.encode(lower, add_bos=False)
    if len(ids) == 1 and ids[0] < vocab_size:
      table[token] = ids[0]
  return table


@contextlib.contextmanager
def gate_shut(head: "CopyHead") -> Iterator[None]:
  """Within the block `head` copies nothing (its gate is sigmoid(-1e4) = 0, so the output
  is the LLM's own log-probabilities); the trained gate is put back on exit."""
  trained = head.copy_gate[...]
  head.copy_gate[...] = jnp.full_like(trained, -1e4)
  try:
    yield
  finally:
    head.copy_gate[...] = trained


def _rms1(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


class CopyHead(nnx.Module):
  """Pointer head over the token memory (module docstring).

  The token match is fixed, not learned: a query is the token just read and a key is its
  slot rolled back, exactly (a learned [D, D] map there drifts from the identity by about
  the learning rate per element and step under Adam, which buries the match within a
  few hundred steps). What is learned is what the match cannot say: which event and
  phrase to follow (`query_hidden`, from the LLM state), how sharp the match is
  (`match_scale`), when nothing should be copied (`null_logit`) and how much to copy
  (`gate_w`, `copy_gate`). The state's readouts are divided by the width, so one Adam step
  moves them by about the learning rate times the state's RMS.

  Attributes:
    query_hidden: [D, D] query from the LLM's final-normed state (over D), starts at 0.
    match_scale: scalar multiplying every slot's score, starts at 1.
    null_logit: scalar attention logit of the null slot.
    gate_w: [D] (over sqrt(D)) and copy_gate: scalar, the copy gate's readout of the state
      (named like the cross-attention gates, so the configs' `lr_mults` on `_gate$` speed
      it up as they do those: at lr 1e-4 a scalar moves 0.02 in 200 steps).
    lowercase: `TokenMap` [vocab].
  """

  def __init__(self, width: int, vocab_size: int, *, gate_init: float = -2.0,
               null_init: float | None = None, param_dtype: Any = jnp.float32):
    """Builds a copy-ready head.

    Args:
      width: D, the LLM width (the memory slots' width).
      vocab_size: V, rows of the lowercase table.
      gate_init: b, the gate's starting pre-activation (sigmoid(-2) = 0.12 of the mass
        copied where a slot matches).
      null_init: the null slot's attention logit (default sqrt(D) / 2: half of what a
        slot whose previous token is the token just read scores).
      param_dtype: storage dtype.

    Every parameter starts at a fixed value (no draw from the model's random stream, so
    the other parameters start as they do without the head).
    """
    d = width
    null = d ** 0.5 / 2 if null_init is None else null_init

    def param(value, axes):
      init = sharding.partitioned(lambda *_: jnp.asarray(value, param_dtype), axes)
      return nnx.Param(init(jax.random.key(0), np.shape(value), param_dtype))

    self.query_hidden = param(np.zeros((d, d), np.float32), ("embed", None))
    self.match_scale = param(np.float32(1.0), ())
    self.null_logit = param(np.float32(null), ())
    self.gate_w = param(np.zeros((d,), np.float32), ("embed",))
    self.copy_gate = param(np.float32(gate_init), ())
    self.lowercase = TokenMap(jnp.arange(vocab_size, dtype=jnp.int32))

  def set_lowercase(self, table: np.ndarray | jax.Array) -> None:
    """Sets the lowercase table (int[vocab], `lowercase_table`)."""
    table = jnp.asarray(table, jnp.int32)
    if table.shape != self.lowercase.shape:
      raise ValueError(f"copy head lowercase table of shape {table.shape}; the LLM "
                       f"vocabulary needs {self.lowercase.shape}")
    self.lowercase[...] = table

  def slot_keys(self, slots: jax.Array) -> jax.Array:
    """Memory slots [B,S,D] -> keys [B,S,D]: each slot rolled back by half the width, so
    its previous token sits where a query holds the token just read (the keys depend on
    the context alone: a decoder computes them once per prompt)."""
    return jnp.roll(slots.astype(jnp.float32), -(slots.shape[-1] // 2), axis=-1)

  def gate(self) -> jax.Array:
    """sigmoid(b): the copied share where a slot matches and the state reads 0."""
    return jax.nn.sigmoid(self.copy_gate[...].astype(jnp.float32))

  def __call__(self, logits: jax.Array, hidden: jax.Array, token_embeds: jax.Array,
               keys: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mixes the copy distribution into the LLM's: -> float32 log-probabilities [B,T,V].

    Args:
      logits: [B,T,V] the LLM head's logits.
      hidden: [B,T,D] final-normed LLM states at the same positions.
      token_embeds: [B,T,D] input embeddings of the lowercased tokens at those positions
        (the token each position has just read).
      keys: [B,S,D] `slot_keys` of the memory slots.
      ids: int[B,S] each slot's token.
      mask: [B,S] bool, True on real slots.
    """
    d = hidden.shape[-1]
    h = hidden.astype(jnp.float32)
    q = _rms1(token_embeds) + jnp.einsum(
        "BTD,DK->BTK", h, self.query_hidden[...].astype(jnp.float32)) / d
    scores = (jnp.einsum("BTK,BSK->BTS", q, keys.astype(jnp.float32)) / d ** 0.5
              * self.match_scale[...].astype(jnp.float32))
    scores = jnp.where(jnp.asarray(mask, bool)[:, None, :], scores, -jnp.inf)
    null = jnp.broadcast_to(self.null_logit[...].astype(jnp.float32), scores.shape[:2] + (1,))
    attn = jax.nn.softmax(jnp.concatenate([null, scores], axis=-1), axis=-1)
    a_null, a = attn[..., 0], attn[..., 1:]                                   # [B,T], [B,T,S]
    g = jax.nn.sigmoid(jnp.einsum("BTD,D->BT", h, self.gate_w[...].astype(jnp.float32))
                       / d ** 0.5 + self.copy_gate[...].astype(jnp.float32))
    b, t, v = logits.shape
    lp = jax.nn.log_softmax(logits, axis=-1)
    lower = self.lowercase[...]
    # Copied mass per lowercase class (the memory is lowercase), ...
    rows = jnp.arange(b)[:, None, None]
    cols = jnp.arange(t)[None, :, None]
    slot_ids = jnp.take(lower, jnp.clip(jnp.asarray(ids, jnp.int32), 0, v - 1))[:, None, :]
    by_class = jnp.zeros((b, t, v), jnp.float32).at[rows, cols, slot_ids].add(g[..., None] * a)
    # ... spread over the class's tokens ("came", "Came") as the LLM weighs them: the copy
    # picks the word, the LLM its casing. A fixed weighting (no gradient: the division
    # by a class's probability would pass gradients of 1/p on), with a floor that splits
    # evenly a class the LLM gives no probability at all.
    p = jax.lax.stop_gradient(jnp.exp(lp))
    class_p = jnp.zeros_like(p).at[..., lower].add(p)
    class_size = jnp.zeros((v,), jnp.float32).at[lower].add(1.0)
    share = (p + _FLOOR) / (class_p[..., lower] + _FLOOR * class_size[lower])
    copied = by_class[..., lower] * share
    keep = 1.0 - g * (1.0 - a_null)                                           # [B,T]
    # log of the copies where there are any, -inf elsewhere (the inner where keeps the
    # gradient of the log finite where it is not taken).
    some = copied > _FLOOR
    log_copied = jnp.where(some, jnp.log(jnp.where(some, copied, 1.0)), -jnp.inf)
    mixed = jnp.logaddexp(jnp.log(keep)[..., None] + lp, log_copied)
    return sharding.with_logical_constraint(mixed, sharding.ACT_BTV)
