"""Cross-attention keys/values are projected once per prompt and reused while decoding.

Checks that the cached path (`Decoder.precompute_context` -> `CrossContext` in the
`DecodeState`) gives the same block outputs, greedy tokens, beams and scores as paths that
re-project the raw user context, and that XLA counts fewer FLOPs per decode step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.bridge.cross_attention import GatedCrossAttention
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.llm import beam_search as bs
from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm import trie as trie_lib
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import CrossContext, Decoder

PROMPTS = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 31, 7, 64, 2]]
B = len(PROMPTS)
E = ENCODER_TINY.max_len
NUM_VALID = np.array([E, 3, 5])  # rows 1 and 2 have padded (ignored) events
M = 6
END = 250
TITLES = [[10, 11, 12], [10, 11], [10, 13, 14, 15], [40], [41, 42], [41, 43], [99, 98]]


def user_batch(seed=0):
  """Encoder features of B users, right-padded after NUM_VALID events."""
  rng = np.random.default_rng(seed)
  mask = np.arange(E)[None] < NUM_VALID[:, None]

  def ids(high, shape):
    m = mask.reshape(mask.shape + (1,) * (len(shape) - 2))
    return np.where(m, rng.integers(2, high, shape), 0).astype(np.int32)

  return {"inputs_item": ids(ENCODER_TINY.num_items, (B, E)),
          "inputs_rating": ids(ENCODER_TINY.num_ratings, (B, E)),
          "inputs_category": ids(ENCODER_TINY.num_categories, (B, E, 3)),
          "inputs_time": ids(ENCODER_TINY.num_time_buckets, (B, E)),
          "mask": mask}


@pytest.fixture(scope="module")
def setup():
  """(UserLLM in cross-attention mode with open gates, its context [B,E,D], mask [B,E])."""
  model = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=2),
                       encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)),
                       llm=Decoder(LLM_TINY, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(2))
  # Non-zero gates so that the user context changes the logits.
  for blk in model.llm.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(0.5)
    blk.mlp_gate[...] = jnp.asarray(0.5)
  context, mask = nnx.jit(lambda m, b: m.user_context(b))(model, user_batch())
  return model, context, mask


def _prompt_arrays(prompts, bucket=8):
  tokens, mask = sampler_lib.left_pad(prompts, 0, bucket)
  return jnp.asarray(tokens), jnp.asarray(mask)


# -- reference: the raw context re-projected at every forward -----------------------------


@functools.partial(jax.jit, static_argnums=0, static_argnames="cache_length")
def _ref_prefill(graphdef, params, tokens, prompt_mask, context, context_mask, *,
                 cache_length):
  """`sampler.prefill` with the raw context: state = (DecodeState w/o context, ctx, mask)."""
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
  slot_valid = jnp.zeros((b, cache_length), bool).at[:, :t].set(prompt_mask)
  causal = jnp.arange(cache_length)[None, :] <= jnp.arange(t)[:, None]
  logits, cache = model(tokens, positions=positions,
                        attention_mask=causal[None] & slot_valid[:, None, :],
                        cache=model.init_cache(b, cache_length), context=context,
                        context_mask=context_mask)
  state = sampler_lib.DecodeState(cache=cache, slot_valid=slot_valid,
                                  next_position=prompt_mask.sum(-1).astype(jnp.int32))
  return logits[:, -1], (state, context, context_mask)


def _ref_step(model, tokens, ref_state):
  """One decode step that re-projects the raw context (the behaviour before caching)."""
  state, context, context_mask = ref_state
  slot_valid = state.slot_valid.at[:, state.cache.end_index].set(True)
  logits, cache = model(tokens[:, None], positions=state.next_position[:, None],
                        attention_mask=slot_valid[:, None, :], cache=state.cache,
                        context=context, context_mask=context_mask)
  state = state.replace(cache=cache, slot_valid=slot_valid,
                        next_position=state.next_position + 1)
  return logits[:, 0], (state, context, context_mask)


def _ref_reorder(ref_state, rows):
  state, context, context_mask = ref_state
  return sampler_lib.reorder_state(state, rows), context[rows], context_mask[rows]


def _full_forward_logp(model, sequences, context, context_mask):
  """log-softmax [B,W,V] of right-padded full sequences (no KV cache, raw context)."""
  width = max(map(len, sequences))
  buf = np.zeros((len(sequences), width), np.int32)
  for i, s in enumerate(sequences):
    buf[i, :len(s)] = s
  positions = jnp.broadcast_to(jnp.arange(width), buf.shape)
  logits, _ = nnx.jit(lambda m, x, p, c, cm: m(x, positions=p, context=c, context_mask=cm))(
      model, jnp.asarray(buf), positions, context, context_mask)
  return np.asarray(jax.nn.log_softmax(logits, -1))


# -- the block -----------------------------------------------------------------------------


def test_block_with_precomputed_kv_equals_raw_context():
  blk = GatedCrossAttention(32, context_width=24, num_heads=4, head_dim=8, mlp_dim=48,
                            gate_init=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  ctx = jax.random.normal(jax.random.key(1), (2, 6, 24))
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
  k, v = blk.context_kv(ctx)
  assert k.shape == v.shape == (2, 6, 4, 8)
  raw = blk(x, ctx, mask)
  np.testing.assert_allclose(blk(x, context_mask=mask, context_kv=(k, v)), raw,
                             rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(raw - x).max()) > 1e-2  # the open gates let the block act
  # Padded events stay masked on the cached path: scrambling their keys/values (and the
  # raw padded embeddings) changes nothing.
  noise = jax.random.normal(jax.random.key(2), k.shape) * 100
  pad = ~mask[..., None, None]
  scrambled = blk(x, context_mask=mask,
                  context_kv=(jnp.where(pad, noise, k), jnp.where(pad, -noise, v)))
  np.testing.assert_allclose(scrambled, raw, rtol=1e-6, atol=1e-6)
  ctx2 = jnp.where(~mask[..., None], 50.0, ctx)
  np.testing.assert_allclose(blk(x, context_mask=mask, context_kv=blk.context_kv(ctx2)), raw,
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="context"):
    blk(x, None, mask)


def test_decoder_with_cross_context_equals_raw_context(setup):
  model, context, mask = setup
  llm = model.llm
  tokens = jnp.asarray(np.arange(B * 7).reshape(B, 7) % 200)
  pos = jnp.broadcast_to(jnp.arange(7), (B, 7))

  @nnx.jit
  def both(m, tokens, context, mask):
    cross = m.precompute_context(context, mask)
    return (m(tokens, positions=pos, context=context, context_mask=mask)[0],
            m(tokens, positions=pos, context=cross)[0], cross)

  raw, cached, cross = both(llm, tokens, context, mask)
  assert isinstance(cross, CrossContext) and cross.raw is None
  assert sorted(cross.k) == sorted(llm.cross_attention) == ["0", "2"]
  assert cross.k["0"].shape == (B, E, LLM_TINY.num_heads, LLM_TINY.head_dim)
  np.testing.assert_allclose(cached, raw, rtol=1e-5, atol=1e-5)
  plain, _ = nnx.jit(lambda m, t: m(t, positions=pos))(llm, tokens)
  assert float(jnp.abs(raw - plain).max()) > 1e-2  # the context matters
  # Rows of a CrossContext follow `take` (beam reordering / tiling).
  rows = jnp.asarray([2, 0, 0])
  taken = cross.take(rows)
  np.testing.assert_array_equal(taken.k["2"], cross.k["2"][rows])
  np.testing.assert_array_equal(taken.mask, mask[rows])


# -- decoding ------------------------------------------------------------------------------


def test_greedy_decode_with_cache_equals_recomputing_reference(setup):
  model, context, mask = setup
  llm = model.llm
  out = sampler_lib.Sampler(llm, length_bucket=8)(
      PROMPTS, max_new_tokens=M, context=context, context_mask=mask, return_logprobs=True)
  # Reference 1: the uncached full-sequence forward with the raw context at every step.
  buf = [list(p) for p in PROMPTS]
  want_tok, want_logp = [], []
  for _ in range(M):
    logp = _full_forward_logp(llm, buf, context, mask)
    last = logp[np.arange(B), [len(s) - 1 for s in buf]]  # [B, V]
    tok = last.argmax(-1)
    want_tok.append(tok)
    want_logp.append(last[np.arange(B), tok])
    for s, t in zip(buf, tok):
      s.append(int(t))
  np.testing.assert_array_equal(out.tokens, np.stack(want_tok, 1))
  np.testing.assert_allclose(out.log_probs, np.stack(want_logp, 1), atol=1e-5)

  # Reference 2: the KV-cache decode loop re-projecting the raw context at every step;
  # its logits match the cached path's at each step.
  graphdef, params = nnx.split(llm)
  tokens, pmask = _prompt_arrays(PROMPTS)
  cache_length = tokens.shape[1] + M
  ref_logits, ref_state = _ref_prefill(graphdef, params, tokens, pmask, context, mask,
                                       cache_length=cache_length)
  logits, state = sampler_lib.prefill_jitted(graphdef, params, tokens, pmask, None, context,
                                             mask, cache_length=cache_length)
  assert isinstance(state.context, CrossContext)
  step = nnx.jit(sampler_lib.decode_step)
  ref = nnx.jit(_ref_step)
  for i in range(M):
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    tok = jnp.asarray(out.tokens[:, i])
    logits, state = step(llm, tok, state)
    ref_logits, ref_state = ref(llm, tok, ref_state)

  # A different user gives different tokens: the cached context is really read.
  other = sampler_lib.Sampler(llm, length_bucket=8)(
      PROMPTS, max_new_tokens=M, context=context[::-1], context_mask=mask[::-1])
  assert not np.array_equal(other.tokens, out.tokens)


@pytest.fixture(scope="module")
def trie():
  return trie_lib.TokenTrie(TITLES, LLM_TINY.vocab_size, end_token=END)


def test_beam_search_with_cache_equals_recomputing_reference(setup, trie):
  model, context, mask = setup
  llm = model.llm
  k = 3
  got = bs.beam_search_model(llm, PROMPTS, beam_size=k, max_steps=trie.max_depth,
                             stop_tokens=[END], constraint=trie.to_arrays(), length_bucket=8,
                             context=context, context_mask=mask)
  graphdef, params = nnx.split(llm)
  tokens, pmask = _prompt_arrays(PROMPTS)

  @jax.jit
  def reference(params, tokens, pmask, context, mask):
    logits, state = _ref_prefill(graphdef, params, tokens, pmask, context, mask,
                                 cache_length=tokens.shape[1] + trie.max_depth)
    step = functools.partial(_ref_step, nnx.merge(graphdef, params))
    return bs.beam_search(step, state, logits, beam_size=k, max_steps=trie.max_depth,
                          stop_tokens=[END], constraint=trie.to_arrays(),
                          reorder_fn=_ref_reorder)

  want = jax.device_get(reference(params, tokens, pmask, context, mask))
  assert got.valid.all()
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_exhaustive_beam_and_scoring_equal_full_forward_with_context(setup, trie):
  model, context, mask = setup
  llm = model.llm
  seqs = trie.sequences()
  n = len(seqs)
  out = bs.beam_search_model(llm, PROMPTS, beam_size=n, max_steps=trie.max_depth,
                             stop_tokens=[END], constraint=trie.to_arrays(), length_bucket=8,
                             context=context, context_mask=mask)
  for row, prompt in enumerate(PROMPTS):
    ctx, cmask = context[row:row + 1], mask[row:row + 1]
    logp = _full_forward_logp(llm, [prompt + s for s in seqs],
                              jnp.repeat(ctx, n, 0), jnp.repeat(cmask, n, 0))
    t = len(prompt)
    exact = np.asarray([sum(float(logp[i, t - 1 + j, tok]) for j, tok in enumerate(s))
                        for i, s in enumerate(seqs)])
    scored = bs.score_candidates(llm, prompt, seqs, batch_size=3, context=ctx,
                                 context_mask=cmask, length_bucket=8)
    np.testing.assert_allclose(scored, exact, atol=1e-4)
    order = np.argsort(-exact)
    beams = [list(out.tokens[row, j, :out.lengths[row, j]]) for j in range(n)]
    assert beams == [seqs[i] for i in order]
    np.testing.assert_allclose(out.scores[row], exact[order], atol=1e-4)


def test_batched_scoring_equals_one_prompt_at_a_time_with_context(setup, trie):
  """All prompts (of different lengths, each with its own user context) prefilled together
  and their candidates scored in one call per chunk: the per-prompt figures."""
  model, context, mask = setup
  llm = model.llm
  seqs = trie.sequences()
  assert len({len(p) for p in PROMPTS}) > 1   # the left padding differs between rows
  batched = bs.score_candidates_batch(llm, PROMPTS, seqs, batch_size=3, context=context,
                                      context_mask=mask, length_bucket=8)
  assert batched.shape == (len(PROMPTS), len(seqs))
  for row, prompt in enumerate(PROMPTS):
    one = bs.score_candidates(llm, prompt, seqs, batch_size=3,
                              context=context[row:row + 1], context_mask=mask[row:row + 1],
                              length_bucket=8)
    np.testing.assert_allclose(batched[row], one, atol=1e-4)
  # Each row reads its own user: swapping the contexts changes the scores.
  swapped = bs.score_candidates_batch(llm, PROMPTS, seqs, batch_size=3,
                                      context=context[::-1], context_mask=mask[::-1],
                                      length_bucket=8)
  assert not np.allclose(swapped[0], batched[0], atol=1e-3)
  with pytest.raises(ValueError, match="non-empty candidate"):
    bs.score_candidates_batch(llm, PROMPTS, [[1], []])


# -- cost ----------------------------------------------------------------------------------


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def test_cached_decode_step_saves_the_context_projection_flops(setup):
  model, context, mask = setup
  llm = model.llm
  graphdef, params = nnx.split(llm)
  tokens, pmask = _prompt_arrays(PROMPTS)
  cache_length = tokens.shape[1] + 2
  logits, state = sampler_lib.prefill_jitted(graphdef, params, tokens, pmask, None, context,
                                             mask, cache_length=cache_length)
  _, ref_state = _ref_prefill(graphdef, params, tokens, pmask, context, mask,
                              cache_length=cache_length)
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  cached = _flops(lambda p, t, s: sampler_lib.decode_step(nnx.merge(graphdef, p), t, s),
                  params, tok, state)
  recomputed = _flops(lambda p, t, s: _ref_step(nnx.merge(graphdef, p), t, s),
                      params, tok, ref_state)
  blocks = list(llm.cross_attention.values())
  c = context.shape[-1]
  # K and V projections: 2 matmuls of [B*E, C] x [C, N*H] per block, 2 FLOPs per MAC.
  projection = sum(2 * B * E * c * b.attn.num_heads * b.attn.head_dim * 2 for b in blocks)
  saved = recomputed - cached
  assert saved >= 0.99 * projection, (cached, recomputed, projection)
  # ... and not more than the projections plus the context LayerNorms (a few FLOPs/entry).
  assert saved <= projection + 20 * B * E * c * len(blocks), (cached, recomputed, projection)


class _Shift(nnx.Module):
  """A block without `context_kv`: adds the masked mean of the raw context."""

  def __call__(self, x, context, context_mask):
    w = context_mask[..., None].astype(x.dtype)
    return x + (context * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1)


def test_blocks_without_context_kv_read_the_raw_context():
  llm = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  llm.cross_attention["1"] = GatedCrossAttention(
      LLM_TINY.width, num_heads=2, head_dim=8, mlp_dim=32, gate_init=0.5, rngs=nnx.Rngs(1))
  llm.cross_attention["3"] = _Shift()
  context = jax.random.normal(jax.random.key(0), (2, 4, LLM_TINY.width))
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  tokens = jnp.asarray([[3, 4, 5], [6, 7, 8]])
  pos = jnp.broadcast_to(jnp.arange(3), (2, 3))

  @nnx.jit
  def both(m):
    cross = m.precompute_context(context, mask)
    return (m(tokens, positions=pos, context=context, context_mask=mask)[0],
            m(tokens, positions=pos, context=cross)[0], cross)

  raw, cached, cross = both(llm)
  assert list(cross.k) == ["1"] and cross.raw is not None
  np.testing.assert_allclose(cached, raw, rtol=1e-5, atol=1e-5)
  # A CrossContext built for other blocks is refused with the block's name.
  llm.cross_attention["2"] = GatedCrossAttention(
      LLM_TINY.width, num_heads=2, head_dim=8, mlp_dim=32, rngs=nnx.Rngs(2))
  with pytest.raises(ValueError, match="'2'"):
    llm(tokens, positions=pos, context=cross.replace(raw=None))


def test_sharded_cached_decode_matches_unsharded(setup):
  """Mesh data=2 x fsdp=2 x tensor=2: the constrained k/v cache decodes the same tokens."""
  if len(jax.devices()) < 8:
    pytest.fail("tests/conftest.py should provide 8 fake CPU devices")
  model, context, mask = setup
  rows = np.asarray([0, 1, 2, 0])  # a batch of 4 divides data x fsdp
  prompts = [PROMPTS[r] for r in rows]
  want = sampler_lib.Sampler(model.llm, length_bucket=8)(
      prompts, max_new_tokens=M, context=context[rows], context_mask=mask[rows],
      return_logprobs=True)
  mesh = sharding.make_mesh((2, 2, 2))
  llm = nnx.clone(model.llm)
  sharding.shard_model(llm, mesh)
  with jax.set_mesh(mesh):
    ctx = jax.device_put(context[rows], sharding.logical_sharding(mesh, ("batch",)))
    got = sampler_lib.Sampler(llm, length_bucket=8)(
        prompts, max_new_tokens=M, context=ctx, context_mask=mask[rows],
        return_logprobs=True)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)
