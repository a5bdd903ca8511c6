"""Constrained beam search returning K distinct complete sequences, and exact scoring.

Procedure (stated here because Recall@K reports must state it):

* Beam width K per prompt. At step i every alive beam b with summed log-prob s_b proposes
  every allowed token t (the constraint's mask, e.g. a `TokenTrie` over catalogue titles)
  with score s_b + log p(t | beam b). Candidates that emit a stop token (e.g. `<|im_end|>`)
  become *finished hypotheses*, kept in a separate top-K pool; the best K of the other
  candidates become the next alive beams (the KV cache rows are gathered by beam parent).
* Only beam 0 is alive at the start (the others score -inf), and every candidate is a
  distinct (parent beam, token) pair, so all alive beams and all finished hypotheses are
  distinct token sequences: the output never contains duplicates.
* The score of a sequence is its summed log-prob (stop token included). With
  `length_penalty=alpha > 0` finished hypotheses are ranked by sum / length**alpha instead
  (off by default: Recall@K uses the plain joint probability of the title).
* The search stops when no beam is alive, after `max_steps`, or (alpha = 0) as soon as the
  K-th finished score is at least the best alive score: log-probs only decrease, so no
  alive beam can still enter the top K. With K >= the number of stored sequences the
  search is exhaustive and equals exact scoring of every candidate.

Outputs are sorted by score, best first; slots with `valid=False` (fewer than K complete
sequences reachable) have score -inf.

The algorithm is written over an abstract `step_fn(tokens [N], cache) -> (logits [N, V],
cache)` and `reorder_fn(cache, rows [N]) -> cache`; `beam_search_model` wires it to the
Decoder's KV cache, and `score_candidates` scores every candidate by teacher forcing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm.model import Decoder

NEG_INF = -jnp.inf

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


@flax.struct.dataclass
class BeamSearchOutput:
  """K distinct complete sequences per prompt, best first.

  Attributes:
    tokens: [B, K, L] int32 generated tokens (stop token included), `pad_id` after `lengths`.
    lengths: [B, K] int32 number of generated tokens.
    scores: [B, K] float32 ranking score (log-prob sum, or length-normalized); -inf if invalid.
    log_probs: [B, K] float32 summed log-probs of the tokens.
    valid: [B, K] bool, False for empty slots.
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  log_probs: jax.Array
  valid: jax.Array


@flax.struct.dataclass
class _State:
  step: jax.Array            # int32 scalar: tokens generated so far
  logits: jax.Array          # [B*K, V] next-token logits of the alive beams
  cache: Any                 # decoder state, B*K rows
  cstate: Any                # constraint state, B*K rows
  alive_tokens: jax.Array    # [B, K, L]
  alive_logp: jax.Array      # [B, K]
  fin_tokens: jax.Array      # [B, K, L]
  fin_logp: jax.Array        # [B, K]
  fin_score: jax.Array       # [B, K]
  fin_len: jax.Array         # [B, K]


def gather_rows(tree: Any, rows: jax.Array) -> Any:
  """Gathers the leading (row) axis of every array leaf of `tree`."""
  return jax.tree.map(lambda x: x[rows], tree)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, K, ...] gathered along K by idx [B, J] -> [B, J, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(step_fn: StepFn, cache: Any, first_logits: jax.Array, *, beam_size: int,
                max_steps: int, stop_tokens: Sequence[int], constraint: Any = None,
                reorder_fn: ReorderFn = gather_rows, length_penalty: float = 0.0,
                pad_id: int = 0) -> BeamSearchOutput:
  """Beam search over an abstract decoder (traceable: call it inside `jax.jit`).

  Args:
    step_fn: `(tokens [N], cache) -> (logits [N, V], cache)` with N = B * beam_size; feeds
      one token per row and returns the logits for the following token.
    cache: decoder state for the B prompts (B rows); tiled to N rows with `reorder_fn`.
    first_logits: [B, V] logits for the first generated token (end of the prefill).
    beam_size: K, the number of beams and of returned sequences.
    max_steps: maximum generated length L (e.g. the trie's `max_depth`).
    stop_tokens: tokens that complete a hypothesis.
    constraint: None or an object with `init(n)`, `mask(state) -> [N, V] bool` and
      `update(state, tokens [N])` (e.g. `TrieArrays`); its state has rows on axis 0.
    reorder_fn: `(cache, rows [N]) -> cache` gathering cache rows (default: axis 0 of
      every leaf; a `KVCache` with rows on axis 1 needs its own).
    length_penalty: alpha for ranking finished hypotheses by logp / length**alpha.
    pad_id: filler token after each sequence's end.

  Returns:
    A `BeamSearchOutput`.
  """
  b, v = first_logits.shape
  k, steps = int(beam_size), int(max_steps)
  if k < 1 or steps < 1:
    raise ValueError(f"beam_size ({beam_size}) and max_steps ({max_steps}) must be >= 1")
  if not stop_tokens:
    raise ValueError("beam_search needs at least one stop token to complete a hypothesis")
  is_stop = jnp.zeros((v,), bool).at[jnp.asarray(list(stop_tokens))].set(True)  # [V]
  tile = jnp.repeat(jnp.arange(b), k)  # [B*K] prompt of each beam row
  cstate = constraint.init(b * k) if constraint is not None else ()
  alive_logp = jnp.full((b, k), NEG_INF).at[:, 0].set(0.0)
  tokens0 = jnp.full((b, k, steps), pad_id, jnp.int32)
  state = _State(
      step=jnp.zeros((), jnp.int32), logits=first_logits[tile].astype(jnp.float32),
      cache=reorder_fn(cache, tile), cstate=cstate, alive_tokens=tokens0,
      alive_logp=alive_logp, fin_tokens=tokens0, fin_logp=jnp.full((b, k), NEG_INF),
      fin_score=jnp.full((b, k), NEG_INF), fin_len=jnp.zeros((b, k), jnp.int32))

  def cond(s: _State) -> jax.Array:
    best_alive = s.alive_logp.max(axis=-1)  # [B]
    open_rows = best_alive > NEG_INF
    if length_penalty == 0.0:
      open_rows &= best_alive > s.fin_score.min(axis=-1)
    return (s.step < steps) & open_rows.any()

  def body(s: _State) -> _State:
    logp = jax.nn.log_softmax(s.logits, axis=-1)  # [B*K, V]
    if constraint is not None:
      logp = jnp.where(constraint.mask(s.cstate), logp, NEG_INF)
    cand = (s.alive_logp[..., None] + logp.reshape(b, k, v))  # [B, K, V]
    cand_stop = jnp.where(is_stop, cand, NEG_INF).reshape(b, k * v)
    cand_go = jnp.where(is_stop, NEG_INF, cand).reshape(b, k * v)

    # Newly finished hypotheses, merged with the finished pool (top K of 2K).
    new_fin_logp, idx = jax.lax.top_k(cand_stop, k)  # [B, K]
    parent, tok = idx // v, idx % v
    new_fin_tokens = _take(s.alive_tokens, parent).at[:, :, s.step].set(tok)
    length = (s.step + 1).astype(jnp.float32)
    new_fin_score = new_fin_logp / length**length_penalty if length_penalty else new_fin_logp
    pool_score = jnp.concatenate([s.fin_score, new_fin_score], axis=1)  # [B, 2K]
    fin_score, keep = jax.lax.top_k(pool_score, k)  # [B, K]
    fin_tokens = _take(jnp.concatenate([s.fin_tokens, new_fin_tokens], 1), keep)
    fin_logp = _take(jnp.concatenate([s.fin_logp, new_fin_logp], 1), keep)
    fin_len = _take(jnp.concatenate([s.fin_len, jnp.full((b, k), s.step + 1)], 1), keep)

    # Next alive beams: top K non-stop candidates; cache and constraint rows follow.
    alive_logp, idx = jax.lax.top_k(cand_go, k)  # [B, K]
    parent, tok = idx // v, idx % v
    alive_tokens = _take(s.alive_tokens, parent).at[:, :, s.step].set(tok)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)  # [B*K]
    flat_tok = tok.reshape(-1).astype(jnp.int32)
    cstate = s.cstate
    if constraint is not None:
      cstate = constraint.update(gather_rows(cstate, rows), flat_tok)
    logits, cache = step_fn(flat_tok, reorder_fn(s.cache, rows))
    return _State(step=s.step + 1, logits=logits.astype(jnp.float32), cache=cache,
                  cstate=cstate, alive_tokens=alive_tokens, alive_logp=alive_logp,
                  fin_tokens=fin_tokens, fin_logp=fin_logp, fin_score=fin_score,
                  fin_len=fin_len)

  s = jax.lax.while_loop(cond, body, state)
  valid = s.fin_score > NEG_INF
  positions = jnp.arange(steps)
  tokens = jnp.where(positions < s.fin_len[..., None], s.fin_tokens, pad_id)
  return BeamSearchOutput(tokens=tokens, lengths=jnp.where(valid, s.fin_len, 0),
                          scores=s.fin_score, log_probs=s.fin_logp, valid=valid)


# -- wiring to the Decoder ----------------------------------------------------------------


def reorder_beams(state: sampler_lib.DecodeState, rows: jax.Array,
                  ) -> sampler_lib.DecodeState:
  """`reorder_state` for beam search: gathers rows, sharing the cross-attention context.

  Every beam's parent is a beam of the same prompt (`beam_search` picks parents within a
  prompt), and all beams of a prompt hold identical cross-attention keys/values. So once
  the context has been tiled to the B*K beam rows (the first call, from B prompt rows), a
  reorder leaves it where it is instead of gathering [B*K, E, N, H] per block every step.
  """
  context = state.context
  if context is not None and context.mask.shape[0] == rows.shape[0]:
    state = state.replace(context=None)
    return sampler_lib.reorder_state(state, rows).replace(context=context)
  return sampler_lib.reorder_state(state, rows)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("cache_length", "beam_size", "max_steps", "stop_tokens",
                                    "length_penalty", "pad_id"))
def _beam_jit(graphdef, params, tokens, prompt_mask, inputs_embeds, context, context_mask,
              constraint, *, cache_length, beam_size, max_steps, stop_tokens,
              length_penalty, pad_id):
  model = nnx.merge(graphdef, params)
  logits, state = sampler_lib.prefill(model, tokens, prompt_mask, cache_length=cache_length,
                                      inputs_embeds=inputs_embeds, context=context,
                                      context_mask=context_mask)
  return beam_search(functools.partial(sampler_lib.decode_step, model), state, logits,
                     beam_size=beam_size, max_steps=max_steps, stop_tokens=stop_tokens,
                     constraint=constraint, reorder_fn=reorder_beams,
                     length_penalty=length_penalty, pad_id=pad_id)


def beam_search_model(model: Decoder, prompts: Sequence[Sequence[int]] | None = None, *,
                      beam_size: int, max_steps: int, stop_tokens: Sequence[int],
                      constraint: Any = None, length_penalty: float = 0.0, pad_id: int = 0,
                      length_bucket: int = 16, inputs_embeds: jax.Array | None = None,
                      prompt_mask: jax.Array | None = None, context: jax.Array | None = None,
                      context_mask: jax.Array | None = None) -> BeamSearchOutput:
  """Constrained beam search with the Decoder's KV cache (one jitted prefill + search).

  Args:
    model: the decoder.
    prompts: token lists (left-padded here), or None when `inputs_embeds` is given.
    beam_size: K beams per prompt = number of returned sequences.
    max_steps: longest generated sequence (for a trie: `trie.max_depth`).
    stop_tokens: tokens that complete a hypothesis (for a trie: its `end_token`).
    constraint: e.g. `TokenTrie.to_arrays()`; None for free beam search.
    length_penalty: alpha of the optional length normalization (0 = off).
    pad_id: padding token of prompts and outputs.
    length_bucket: prompt lengths are rounded up to a multiple of this.
    inputs_embeds / prompt_mask: [B, T, D] left-padded prompt embeddings and their mask.
    context / context_mask: [B, E, D] / [B, E] cross-attention user embeddings.

  Returns:
    A `BeamSearchOutput` of numpy arrays ([B, K, max_steps] tokens, best first).
  """
  if inputs_embeds is not None:
    b, t = inputs_embeds.shape[:2]
    tokens = None
    prompt_mask = (jnp.ones((b, t), bool) if prompt_mask is None
                   else jnp.asarray(prompt_mask, bool))
  elif prompts is not None:
    tokens, prompt_mask = sampler_lib.left_pad(prompts, pad_id, length_bucket)
    t = tokens.shape[1]
  else:
    raise ValueError("give `prompts` or `inputs_embeds`")
  graphdef, params = nnx.split(model)
  out = _beam_jit(graphdef, params, tokens, prompt_mask, inputs_embeds, context, context_mask,
                  constraint, cache_length=t + int(max_steps), beam_size=int(beam_size),
                  max_steps=int(max_steps), stop_tokens=tuple(int(s) for s in stop_tokens),
                  length_penalty=float(length_penalty), pad_id=int(pad_id))
  return jax.device_get(out)


@functools.partial(jax.jit, static_argnums=0)
def _score_chunk(graphdef, params, first_logits, state, cand, cand_len, rows=None):
  """Sum of log-probs of candidates [C, L] (right-padded) after prefilled prompts: row
  `rows[c]` of the prefilled batch for candidate c (default: every candidate after row 0)."""
  model = nnx.merge(graphdef, params)
  c, length = cand.shape
  if rows is None:
    rows = jnp.zeros((c,), jnp.int32)
  state = sampler_lib.reorder_state(state, rows)                           # tile the prompts
  first_logits = first_logits[rows]                                        # [C, V]
  t0 = state.cache.end_index
  s = state.slot_valid.shape[1]
  positions = state.next_position[:, None] + jnp.arange(length)[None, :]  # [C, L]
  slot = jnp.arange(s)[None, :]                                            # [1, S]
  new = (slot >= t0) & (slot - t0 <= jnp.arange(length)[:, None])          # [L, S] causal
  mask = state.slot_valid[:, None, :] | new[None]                          # [C, L, S]
  # The prompt's cross-attention keys/values come projected from the prefill.
  logits, _ = model(cand, positions=positions, attention_mask=mask, cache=state.cache,
                    context=state.context)
  # Token i is predicted by position i - 1; token 0 by the end of the prompt.
  pred = jnp.concatenate([jnp.broadcast_to(first_logits[:, None], (c, 1, logits.shape[-1])),
                          logits[:, :-1]], axis=1)                         # [C, L, V]
  logp = jnp.take_along_axis(jax.nn.log_softmax(pred, -1), cand[..., None], -1)[..., 0]
  return jnp.where(jnp.arange(length)[None] < cand_len[:, None], logp, 0.0).sum(-1)  # [C]


def score_candidates_batch(model: Decoder, prompts: Sequence[Sequence[int]],
                           candidates: Sequence[Sequence[int]], *, batch_size: int = 32,
                           context: jax.Array | None = None,
                           context_mask: jax.Array | None = None,
                           length_bucket: int = 16, min_candidate_length: int = 0,
                           ) -> np.ndarray:
  """`score_candidates` for B token prompts at once: [B, C] exact log-probs.

  The B prompts are left-padded to one bucketed length and prefilled together (with their
  rows of the cross-attention `context` [B, E, D]); every prompt's candidates are then
  scored `batch_size` candidates at a time for all B prompts in one call (B x batch_size
  rows). The same figures as B calls of `score_candidates` up to float rounding, at a
  fraction of the dispatches and with full batches for the matmuls.
  """
  _check_candidates(candidates)
  tokens, mask = sampler_lib.left_pad(prompts, 0, length_bucket)
  return _prefill_and_score(model, tokens, mask, None, candidates, batch_size, context,
                            context_mask, min_candidate_length=min_candidate_length)


def _check_candidates(candidates: Sequence[Sequence[int]]) -> None:
  if not candidates or any(len(c) == 0 for c in candidates):
    raise ValueError("candidate scoring needs non-empty candidate token sequences")


def _prefill_and_score(model: Decoder, tokens: np.ndarray | None, mask: jax.Array,
                       inputs_embeds: jax.Array | None, candidates: Sequence[Sequence[int]],
                       batch_size: int, context: jax.Array | None,
                       context_mask: jax.Array | None, show_progress: bool = False,
                       min_candidate_length: int = 0) -> np.ndarray:
  """Prefills the B left-padded prompts once, then scores every candidate after each:
  [B, C] summed log-probs (chunks of `batch_size` candidates x B prompts per call)."""
  b = mask.shape[0]
  length = max(max(len(c) for c in candidates), min_candidate_length)
  graphdef, params = nnx.split(model)
  first_logits, state = sampler_lib.prefill_jitted(
      graphdef, params, tokens, mask, inputs_embeds, context, context_mask,
      cache_length=mask.shape[1] + length)
  n = len(candidates)
  size = min(batch_size, n)
  padded = -(-n // size) * size
  cand = np.zeros((padded, length), np.int32)
  cand_len = np.ones((padded,), np.int32)
  for i, c in enumerate(candidates):
    cand[i, :len(c)] = c
    cand_len[i] = len(c)
  rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), size)                 # [B * size]
  out = []
  for lo in tqdm.trange(0, padded, size, desc="scoring candidates", disable=not show_progress):
    chunk = np.tile(cand[lo:lo + size], (b, 1))                           # [B * size, L]
    chunk_len = np.tile(cand_len[lo:lo + size], b)
    scores = _score_chunk(graphdef, params, first_logits, state, jnp.asarray(chunk),
                          jnp.asarray(chunk_len), rows)
    out.append(np.asarray(scores).reshape(b, size))
  return np.concatenate(out, axis=1)[:, :n]


def left_pad_embeds(inputs_embeds: jax.Array, bucket: int) -> tuple[jax.Array, jax.Array]:
  """[B, T, D] all-real prompt embeddings -> ([B, T', D], mask [B, T']) left-padded with
  zeros to T' = T rounded up to a multiple of `bucket` (mask True on the real slots)."""
  t = inputs_embeds.shape[1]
  padded = -(-t // bucket) * bucket
  embeds = jnp.pad(inputs_embeds, ((0, 0), (padded - t, 0), (0, 0)))
  mask = jnp.broadcast_to(jnp.arange(padded) >= padded - t, embeds.shape[:2])
  return embeds, mask


def score_candidates(model: Decoder, prompt: Sequence[int] | None,
                     candidates: Sequence[Sequence[int]], *, batch_size: int = 32,
                     inputs_embeds: jax.Array | None = None,
                     context: jax.Array | None = None, context_mask: jax.Array | None = None,
                     length_bucket: int = 16, show_progress: bool = False,
                     min_candidate_length: int = 0) -> np.ndarray:
  """Exact log p(candidate | prompt) of every candidate by teacher forcing.

  The prompt is prefilled once; candidates are scored `batch_size` at a time against a
  copy of its cache (the last chunk is padded so every chunk has the same shape). Use for
  small catalogues; it ranks all titles exactly (beam search with K >= number of titles
  gives the same ranking).

  Args:
    model: the decoder.
    prompt: prompt tokens, or None when `inputs_embeds` ([1, T, D]) is given.
    candidates: token sequences to score (include the end token when it should count).
    batch_size: candidates per forward pass.
    inputs_embeds: [1, T, D] prompt embeddings (soft prompt), every slot real.
    context / context_mask: [1, E, D] / [1, E] cross-attention user embeddings.
    length_bucket: prompt length rounding, for tokens and embeddings alike (limits
      recompiles across prompts).
    show_progress: show a tqdm bar over chunks.
    min_candidate_length: score at least this many positions per candidate (the padding
      is masked, the scores do not change): calls whose longest candidate differs then
      share one compiled shape.

  Returns:
    [C] float32 summed log-probs.
  """
  _check_candidates(candidates)
  if inputs_embeds is not None:
    # Left-padded to a multiple of `length_bucket` like token prompts: soft prompts of
    # users with different numbers of events would otherwise compile once per length.
    tokens = None
    inputs_embeds, mask = left_pad_embeds(inputs_embeds, length_bucket)
  elif prompt is not None:
    tokens, mask = sampler_lib.left_pad([prompt], 0, length_bucket)
  else:
    raise ValueError("give `prompt` or `inputs_embeds`")
  return _prefill_and_score(model, tokens, mask, inputs_embeds, candidates, batch_size,
                            context, context_mask, show_progress, min_candidate_length)[0]


def ranked_items(out: BeamSearchOutput, trie: Any, k: int | None = None) -> list[list[int]]:
  """Catalogue item indices of each prompt's beams, best first, for Recall@K.

  Args:
    out: a (numpy) `BeamSearchOutput` of a search constrained by `trie`.
    trie: the `TokenTrie` the search used (maps a finished sequence to its items).
    k: cut each list to k items (default: the beam size).

  Returns:
    One list per prompt of distinct item indices. Items whose titles tokenize identically
    share a sequence; they are listed together in item-index order (never twice).
  """
  tokens, lengths, valid = (np.asarray(x) for x in (out.tokens, out.lengths, out.valid))
  k = tokens.shape[1] if k is None else int(k)
  ranked = []
  for row in range(tokens.shape[0]):
    items: list[int] = []
    for j in range(tokens.shape[1]):
      if valid[row, j]:
        items.extend(i for i in trie.items_of(tokens[row, j, :lengths[row, j]])
                     if i not in items)
    ranked.append(items[:k])
  return ranked
