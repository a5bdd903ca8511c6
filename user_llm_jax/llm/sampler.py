"""Batched sampling with an explicit KV cache, outside the model.

Prompts of different lengths are left-padded to a common length T (rounded up to a bucket
so that a few shapes cover all calls). The prefill writes the prompt into cache slots
[0, T) with a [B, T, S] mask that hides padding slots, and per-row RoPE positions that
start at 0 on each row's first real token. Decoding then appends one token per step at
slot T + i with position len_b + i. `DecodeState` carries everything a step needs (cache,
valid slots, next positions, cross-attention context), so the same `prefill` /
`decode_step` functions serve the sampler, beam search and the User-LLM bridges (which
prefill with `inputs_embeds` for a soft prompt or pass `context` for cross-attention).
The cross-attention context is projected to per-block keys/values once, at prefill
(`Decoder.precompute_context`); decode steps and beams reuse that `CrossContext`.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, with a
fixed seed. Constrained decoding goes through a `Constraint` (e.g. `trie.TrieArrays`, or
`PrefixFnConstraint` wrapping any host `allowed_next_tokens(prefix)` function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax.llm.model import CrossContext, Decoder, KVCache

NEG_INF = -jnp.inf


class Constraint(Protocol):
  """Restricts the next token per row. Its state is a pytree with rows on axis 0."""

  def init(self, batch_size: int) -> Any:
    ...

  def mask(self, state: Any) -> jax.Array:
    """[B, V] bool, True for allowed next tokens."""

  def update(self, state: Any, tokens: jax.Array) -> Any:
    """State after emitting tokens [B]."""


@flax.struct.dataclass
class PrefixFnConstraint:
  """Wraps a host function `allowed_next_tokens(prefix: list[int]) -> token ids`.

  Runs through `jax.pure_callback` once per step for the whole batch; convenient for
  arbitrary Python rules, slower than a device-side constraint such as `TrieArrays`.
  """
  allowed_next_tokens: Callable[[list[int]], Sequence[int]] = flax.struct.field(
      pytree_node=False)
  vocab_size: int = flax.struct.field(pytree_node=False)
  max_length: int = flax.struct.field(pytree_node=False)

  def init(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
    return (jnp.zeros((batch_size, self.max_length), jnp.int32),
            jnp.zeros((batch_size,), jnp.int32))

  def mask(self, state: tuple[jax.Array, jax.Array]) -> jax.Array:
    def host(prefixes, lengths):
      out = np.zeros((prefixes.shape[0], self.vocab_size), bool)
      for row, (p, n) in enumerate(zip(np.asarray(prefixes), np.asarray(lengths))):
        out[row, np.asarray(list(self.allowed_next_tokens(p[:n].tolist())), int)] = True
      return out
    shape = jax.ShapeDtypeStruct((state[0].shape[0], self.vocab_size), jnp.bool_)
    return jax.pure_callback(host, shape, *state)

  def update(self, state, tokens):
    prefixes, lengths = state
    rows = jnp.arange(prefixes.shape[0])
    pos = jnp.minimum(lengths, self.max_length - 1)
    return prefixes.at[rows, pos].set(tokens), lengths + 1


@flax.struct.dataclass
class DecodeState:
  """Everything one decode step needs, rows on the batch axis.

  Attributes:
    cache: KV cache ([L, B, S, K, H]; `end_index` = next slot to write).
    slot_valid: [B, S] bool, cache slots holding real (non-padding) tokens.
    next_position: [B] int32 RoPE position of the next token.
    context: the cross-attention user context with every block's keys/values already
      projected (`Decoder.precompute_context`; mask included), or None.
  """
  cache: KVCache
  slot_valid: jax.Array
  next_position: jax.Array
  context: CrossContext | None = None


@flax.struct.dataclass
class SamplerOutput:
  """Result of `Sampler.__call__`.

  Attributes:
    tokens: [B, M] generated tokens; the stop token (if any) at index `lengths`, then pad.
    lengths: [B] number of generated tokens before the stop token.
    stopped: [B] bool, True when the row emitted a stop token (False: hit the limit).
    log_probs: [B, M] log p_model(token | prefix) of each generated token under the
      unmodified model distribution (no temperature / top-k / top-p / constraint), 0 after
      the end; None unless requested.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  log_probs: np.ndarray | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = 1,
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length rounded up to a multiple of `bucket`.

  Returns:
    tokens [B, T] int32 and mask [B, T] bool (True on real tokens).

  Raises:
    ValueError: for an empty batch or an empty prompt (naming its index).
  """
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
  t = max(len(p) for p in prompts)
  t = -(-t // bucket) * bucket
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = np.asarray(p, np.int32)
    mask[i, t - len(p):] = True
  return tokens, mask


def prefill(model: Decoder, tokens: jax.Array | None, prompt_mask: jax.Array, *,
            cache_length: int, inputs_embeds: jax.Array | None = None,
            context: jax.Array | CrossContext | None = None,
            context_mask: jax.Array | None = None,
            ) -> tuple[jax.Array, DecodeState]:
  """Runs the (left-padded) prompt through the model into a fresh cache.

  Args:
    model: the decoder.
    tokens: [B, T] left-padded prompt tokens (None when `inputs_embeds` is given).
    prompt_mask: [B, T] bool, True on real prompt positions (padding on the left).
    cache_length: S >= T + number of tokens to decode.
    inputs_embeds: [B, T, D] prompt embeddings (soft prompt merged by the caller).
    context: [B, E, D] cross-attention context (or its `CrossContext`); projected once
      here and kept in the state, so decode steps do not recompute its keys/values.
    context_mask: [B, E] bool (ignored for a `CrossContext`).

  Returns:
    (logits [B, V] float32 for the first new token, DecodeState).
  """
  b, t = prompt_mask.shape
  if cache_length < t:
    raise ValueError(f"cache_length {cache_length} is shorter than the prompt length {t}")
  prompt_mask = prompt_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
  slot_valid = jnp.zeros((b, cache_length), bool).at[:, :t].set(prompt_mask)  # [B, S]
  causal = jnp.arange(cache_length)[None, :] <= jnp.arange(t)[:, None]          # [T, S]
  mask = causal[None] & slot_valid[:, None, :]                                   # [B, T, S]
  cache = model.init_cache(b, cache_length)
  if context is not None and not isinstance(context, CrossContext):
    context = model.precompute_context(context, context_mask)
  hidden, cache = model(tokens, positions=positions, attention_mask=mask, cache=cache,
                        inputs_embeds=inputs_embeds, context=context, return_hidden=True)
  # [B, V]; only the last position is needed
  logits = model.output(hidden[:, -1:], None if tokens is None else tokens[:, -1:],
                        context)[:, 0]
  state = DecodeState(cache=cache, slot_valid=slot_valid,
                      next_position=prompt_mask.sum(-1).astype(jnp.int32),
                      context=context)
  return logits, state


def decode_step(model: Decoder, tokens: jax.Array, state: DecodeState,
                ) -> tuple[jax.Array, DecodeState]:
  """Feeds one token per row ([B]) and returns the next logits [B, V] and state."""
  slot = state.cache.end_index
  slot_valid = state.slot_valid.at[:, slot].set(True)  # [B, S]
  logits, cache = model(tokens[:, None], positions=state.next_position[:, None],
                        attention_mask=slot_valid[:, None, :], cache=state.cache,
                        context=state.context)
  return logits[:, 0], state.replace(cache=cache, slot_valid=slot_valid,
                                     next_position=state.next_position + 1)


def reorder_state(state: DecodeState, rows: jax.Array) -> DecodeState:
  """Gathers rows [N] of a DecodeState (beam reordering or tiling a prompt N times).

  The cached cross-attention keys/values and mask follow their rows, so beams never
  re-project the user context.
  """
  cache = state.cache.replace(k=state.cache.k[:, rows], v=state.cache.v[:, rows])
  return DecodeState(cache=cache, slot_valid=state.slot_valid[rows],
                     next_position=state.next_position[rows],
                     context=None if state.context is None else state.context.take(rows))


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, mask: jax.Array | None = None,
                  ) -> jax.Array:
  """Picks one token per row from logits [B, V].

  Args:
    logits: [B, V] float32.
    rng: PRNG key (unused when greedy).
    temperature: 0 = greedy argmax; otherwise softmax(logits / temperature).
    top_k: keep only the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens with total probability >= top_p.
    mask: [B, V] bool allowed tokens (constrained decoding).

  Returns:
    [B] int32 tokens.
  """
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits >= kth, logits, NEG_INF)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    # The cut-off logit: the smallest one whose better tokens hold < top_p of the mass.
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, NEG_INF)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class _Loop:
  step: jax.Array
  logits: jax.Array       # [B, V]
  state: DecodeState
  cstate: Any
  done: jax.Array         # [B] bool
  stopped: jax.Array      # [B] bool
  lengths: jax.Array      # [B] int32
  tokens: jax.Array       # [B, M]
  log_probs: jax.Array    # [B, M]


def decode_loop(model: Decoder, logits: jax.Array, state: DecodeState, rng: jax.Array,
                stop_tokens: jax.Array, constraint: Any = None, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                pad_id: int = 0) -> _Loop:
  """Samples up to `max_new_tokens` tokens with a `jax.lax.while_loop` (traceable).

  `stop_tokens` is [B, Ns] int32 (per-row stop sets, padded with -1). A row ends at its
  first stop token, or when the constraint allows nothing more.
  """
  b, _ = logits.shape
  m = int(max_new_tokens)

  def cond(s: _Loop):
    return (s.step < m) & ~s.done.all()

  def body(s: _Loop):
    allowed = constraint.mask(s.cstate) if constraint is not None else None
    key = jax.random.fold_in(rng, s.step)
    tok = sample_logits(s.logits, key, temperature=temperature, top_k=top_k, top_p=top_p,
                        mask=allowed)
    stuck = ~allowed.any(-1) if allowed is not None else jnp.zeros((b,), bool)
    live = ~s.done & ~stuck
    tok = jnp.where(live, tok, pad_id)
    logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, -1), tok[:, None], -1)[:, 0]
    is_stop = (tok[:, None] == stop_tokens).any(-1) & live
    tokens = s.tokens.at[:, s.step].set(tok)
    log_probs = s.log_probs.at[:, s.step].set(jnp.where(live, logp, 0.0))
    lengths = s.lengths + (live & ~is_stop)
    cstate = constraint.update(s.cstate, tok) if constraint is not None else s.cstate
    next_logits, state = decode_step(model, tok, s.state)
    return _Loop(step=s.step + 1, logits=next_logits, state=state, cstate=cstate,
                 done=s.done | is_stop | stuck, stopped=s.stopped | is_stop,
                 lengths=lengths, tokens=tokens, log_probs=log_probs)

  init = _Loop(step=jnp.zeros((), jnp.int32), logits=logits.astype(jnp.float32),
               state=state, cstate=constraint.init(b) if constraint is not None else (),
               done=jnp.zeros((b,), bool), stopped=jnp.zeros((b,), bool),
               lengths=jnp.zeros((b,), jnp.int32),
               tokens=jnp.full((b, m), pad_id, jnp.int32),
               log_probs=jnp.zeros((b, m), jnp.float32))
  return jax.lax.while_loop(cond, body, init)


@functools.partial(jax.jit, static_argnums=0, static_argnames="cache_length")
def prefill_jitted(graphdef, params, tokens, prompt_mask, inputs_embeds, context,
                   context_mask, *, cache_length):
  """`prefill` under `jax.jit` for a split model (graphdef static, params traced)."""
  model = nnx.merge(graphdef, params)
  return prefill(model, tokens, prompt_mask, cache_length=cache_length,
                 inputs_embeds=inputs_embeds, context=context, context_mask=context_mask)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "temperature", "top_k", "top_p",
                                    "pad_id"))
def decode_jitted(graphdef, params, logits, state, rng, stop_tokens, constraint, **kw):
  """`decode_loop` under `jax.jit` -> (tokens, lengths, stopped, log_probs)."""
  model = nnx.merge(graphdef, params)
  out = decode_loop(model, logits, state, rng, stop_tokens, constraint, **kw)
  return out.tokens, out.lengths, out.stopped, out.log_probs


def stop_token_array(stop_tokens: Sequence[int] | Sequence[Sequence[int]], batch: int,
                     ) -> np.ndarray:
  """[B, Ns] int32 stop sets from one shared list or one list per row (-1 = padding)."""
  rows = list(stop_tokens)
  if rows and not isinstance(rows[0], (int, np.integer)):
    if len(rows) != batch:
      raise ValueError(f"per-row stop_tokens has {len(rows)} rows for a batch of {batch}")
  else:
    rows = [rows] * batch
  width = max([1] + [len(r) for r in rows])
  out = np.full((batch, width), -1, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


class Sampler:
  """Generates continuations of batched prompts with a Decoder (jitted prefill + loop).

  Example:
    sampler = Sampler(model, pad_id=tok.pad_id, stop_tokens=[tok.eos_id])
    out = sampler([tok.encode("Hello")], max_new_tokens=32)
  """

  def __init__(self, model: Decoder, *, pad_id: int = 0, stop_tokens: Sequence[int] = (),
               length_bucket: int = 16):
    """Args:
      model: the decoder (its current parameters are read at every call).
      pad_id: token used for padding prompts and finished rows.
      stop_tokens: default stop set shared by all rows.
      length_bucket: prompt lengths are rounded up to a multiple of this to limit recompiles.
    """
    self.model = model
    self.pad_id = int(pad_id)
    self.stop_tokens = tuple(int(t) for t in stop_tokens)
    self.length_bucket = int(length_bucket)

  def __call__(self, prompts: Sequence[Sequence[int]] | None = None, *, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
               constraint: Constraint | None = None,
               inputs_embeds: jax.Array | None = None, prompt_mask: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               return_logprobs: bool = False) -> SamplerOutput:
    """Samples continuations.

    Args:
      prompts: token lists of different lengths (left-padded here), or None when
        `inputs_embeds` is given.
      max_new_tokens: M, the most tokens generated per row.
      temperature / top_k / top_p: sampling rule (temperature 0 = greedy).
      seed: PRNG seed; the same seed gives the same tokens.
      stop_tokens: one list for all rows or one list per row (default: the sampler's).
      constraint: allowed-next-token rule (e.g. `TokenTrie.to_arrays()`).
      inputs_embeds: [B, T, D] already left-padded prompt embeddings (soft prompt).
      prompt_mask: [B, T] bool real positions of `inputs_embeds` (default all True).
      context / context_mask: [B, E, D] / [B, E] cross-attention user embeddings.
      return_logprobs: also return per-token model log-probs.

    Returns:
      A `SamplerOutput` of numpy arrays.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"bad sampling parameters temperature={temperature} (>= 0), "
                       f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
    if inputs_embeds is not None:
      b, t = inputs_embeds.shape[:2]
      tokens = None
      prompt_mask = (jnp.ones((b, t), bool) if prompt_mask is None
                     else jnp.asarray(prompt_mask, bool))
    elif prompts is not None:
      tokens, prompt_mask = left_pad(prompts, self.pad_id, self.length_bucket)
      b, t = tokens.shape
    else:
      raise ValueError("give `prompts` or `inputs_embeds`")
    stops = stop_token_array(self.stop_tokens if stop_tokens is None else stop_tokens, b)
    graphdef, params = nnx.split(self.model)
    logits, state = prefill_jitted(graphdef, params, tokens, prompt_mask, inputs_embeds,
                                   context, context_mask,
                                   cache_length=t + int(max_new_tokens))
    out = decode_jitted(graphdef, params, logits, state, jax.random.key(seed),
                        jnp.asarray(stops), constraint, max_new_tokens=int(max_new_tokens),
                        temperature=float(temperature), top_k=int(top_k),
                        top_p=float(top_p), pad_id=self.pad_id)
    tokens_out, lengths, stopped, log_probs = jax.device_get(out)
    return SamplerOutput(tokens=tokens_out, lengths=lengths, stopped=stopped,
                         log_probs=log_probs if return_logprobs else None)
