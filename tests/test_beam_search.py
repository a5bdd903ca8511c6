"""Tests for constrained beam search (toy bigram decoder and the real tiny Decoder)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from user_llm_jax.llm import beam_search as bs
from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm import trie as trie_lib

V = 12
END = 11


def _bigram_step(table):
  """A decoder whose cache is the last token of each row: logits = table[last]."""
  def step(tokens, cache):
    del cache
    return table[tokens], tokens
  return step


def _bigram_logp(table, first, seq):
  logp = jax.nn.log_softmax(table, axis=-1)
  prev, total = first, 0.0
  for t in seq:
    total += float(logp[prev, t])
    prev = t
  return total


@pytest.fixture(scope="module")
def toy():
  table = jax.random.normal(jax.random.key(0), (V, V)) * 3.0
  # Titles (without END) over tokens 0..10, some sharing prefixes, one a prefix of another.
  titles = [[1, 2], [1, 2, 3], [1, 4, 5, 6], [2], [2, 7, 7], [3, 3, 3, 3], [8, 9], [8, 10],
            [5, 1, 2]]
  trie = trie_lib.TokenTrie(titles, V, end_token=END)
  return table, trie


def _run(table, trie, first_tokens, k, length_penalty=0.0):
  first = jnp.asarray(first_tokens, jnp.int32)
  fn = jax.jit(lambda t, c, f: bs.beam_search(
      _bigram_step(table), f, t[f], beam_size=k, max_steps=trie.max_depth,
      stop_tokens=[END], constraint=c, length_penalty=length_penalty))
  return jax.tree.map(np.asarray, fn(table, trie.to_arrays(), first))


def _exact_ranking(table, trie, first):
  seqs = trie.sequences()
  scores = [_bigram_logp(table, first, s) for s in seqs]
  order = np.argsort(scores)[::-1]
  return [seqs[i] for i in order], [scores[i] for i in order]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_only_allowed_distinct_sorted(toy, k):
  table, trie = toy
  out = _run(table, trie, [0, 4], k)
  stored = {tuple(s) for s in trie.sequences()}
  for row in range(2):
    assert out.valid[row].all()
    seqs = [tuple(out.tokens[row, j, :out.lengths[row, j]]) for j in range(k)]
    assert all(s in stored for s in seqs), seqs
    assert len(set(seqs)) == k
    assert np.all(np.diff(out.scores[row]) <= 0)
    # Padding after the end, and scores are the true log-probs of the sequences.
    for j, s in enumerate(seqs):
      assert np.all(out.tokens[row, j, len(s):] == 0)
      np.testing.assert_allclose(out.log_probs[row, j],
                                 _bigram_logp(table, [0, 4][row], s), rtol=1e-5)
    np.testing.assert_allclose(out.scores[row], out.log_probs[row])


def test_exhaustive_beam_equals_exact_scoring(toy):
  table, trie = toy
  n = len(trie.sequences())
  out = _run(table, trie, [0, 7], n + 2)  # K > number of candidates: extra slots invalid
  for row, first in enumerate([0, 7]):
    seqs, scores = _exact_ranking(table, trie, first)
    assert out.valid[row].sum() == n
    got = [list(out.tokens[row, j, :out.lengths[row, j]]) for j in range(n)]
    assert got == seqs
    np.testing.assert_allclose(out.scores[row, :n], scores, rtol=1e-5)
    assert np.all(np.isneginf(out.scores[row, n:]))


def test_beam_top_k_matches_exact_top_k_with_a_peaked_model():
  # A model that strongly prefers one continuation: beam K=2 must find the exact top 2.
  table = jnp.full((V, V), -5.0)
  table = table.at[0, 1].set(5.0).at[1, 2].set(4.0).at[2, END].set(3.0).at[1, 4].set(3.5)
  table = table.at[4, END].set(3.0)
  trie = trie_lib.TokenTrie([[1, 2], [1, 4], [3], [5, 6]], V, end_token=END)
  out = _run(table, trie, [0], 2)
  seqs, scores = _exact_ranking(table, trie, 0)
  got = [list(out.tokens[0, j, :out.lengths[0, j]]) for j in range(2)]
  assert got == seqs[:2]
  np.testing.assert_allclose(out.scores[0], scores[:2], rtol=1e-5)


def test_ranked_items_maps_beams_to_distinct_items():
  table = jax.random.normal(jax.random.key(2), (V, V))
  # Items 1 and 3 share a title; item 2 is a distinct title.
  trie = trie_lib.TokenTrie([[1, 2], [3], [4, 5], [3], [6]], V, end_token=END)
  out = _run(table, trie, [0], 4)
  items = bs.ranked_items(out, trie)[0]
  assert len(items) == len(set(items)) == 4
  assert sorted(items) == sorted(set(items) & {0, 1, 2, 3, 4})
  seqs = [list(out.tokens[0, j, :out.lengths[0, j]]) for j in range(4)]
  first = trie.items_of(seqs[0])
  assert items[:len(first)] == first
  assert bs.ranked_items(out, trie, k=1) == [items[:1]]


def test_length_penalty_ranks_by_mean_log_prob(toy):
  table, trie = toy
  n = len(trie.sequences())
  out = _run(table, trie, [3], n, length_penalty=1.0)
  np.testing.assert_allclose(out.scores[0], out.log_probs[0] / out.lengths[0], rtol=1e-6)
  assert np.all(np.diff(out.scores[0]) <= 1e-7)
  seqs = {tuple(out.tokens[0, j, :out.lengths[0, j]]) for j in range(n)}
  assert seqs == {tuple(s) for s in trie.sequences()}


def test_unconstrained_beams_are_distinct_and_stop_on_end():
  table = jax.random.normal(jax.random.key(1), (V, V)) * 2.0
  first = jnp.asarray([0], jnp.int32)
  out = bs.beam_search(_bigram_step(table), first, table[first], beam_size=4, max_steps=6,
                       stop_tokens=[END])
  out = jax.tree.map(np.asarray, out)
  seqs = [tuple(out.tokens[0, j, :out.lengths[0, j]]) for j in range(4) if out.valid[0, j]]
  assert len(seqs) == len(set(seqs)) > 0
  assert all(s[-1] == END and END not in s[:-1] for s in seqs)
  # Brute force over every sequence of up to 6 tokens is too big; check up to 3 instead:
  # any complete sequence of <= 3 tokens better than the K-th result must be in the output.
  kth = out.scores[0][out.valid[0]].min()
  for n in range(1, 4):
    for body in itertools.product([t for t in range(V) if t != END], repeat=n - 1):
      s = tuple(body) + (END,)
      if _bigram_logp(table, 0, s) > kth + 1e-5:
        assert s in seqs


def test_bad_arguments():
  table = jnp.zeros((V, V))
  first = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="stop token"):
    bs.beam_search(_bigram_step(table), first, table[first], beam_size=2, max_steps=3,
                   stop_tokens=[])
  with pytest.raises(ValueError, match="beam_size"):
    bs.beam_search(_bigram_step(table), first, table[first], beam_size=0, max_steps=3,
                   stop_tokens=[END])


# -- the real tiny Decoder -----------------------------------------------------------------

DEC_END = 250
DEC_TITLES = [[10, 11, 12], [10, 11], [10, 13, 14, 15], [40], [41, 42], [41, 43], [99, 98]]
DEC_PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def decoder():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from user_llm_jax.llm.config import LLM_TINY  # pylint: disable=g-import-not-at-top
  from user_llm_jax.llm.model import Decoder  # pylint: disable=g-import-not-at-top
  return Decoder(LLM_TINY, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def dec_trie():
  return trie_lib.TokenTrie(DEC_TITLES, 256, end_token=DEC_END)


@pytest.fixture(scope="module")
def exhaustive(decoder, dec_trie):
  n = len(dec_trie.sequences())
  return bs.beam_search_model(decoder, DEC_PROMPTS, beam_size=n, max_steps=dec_trie.max_depth,
                              stop_tokens=[DEC_END], constraint=dec_trie.to_arrays(),
                              length_bucket=8)


def test_score_candidates_equals_full_forward(decoder, dec_trie):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  seqs = dec_trie.sequences()
  got = bs.score_candidates(decoder, DEC_PROMPTS[0], seqs, batch_size=3)
  # One uncached forward over every prompt + candidate, right-padded (causal: the padding
  # on the right does not affect the real positions).
  t = len(DEC_PROMPTS[0])
  width = t + max(map(len, seqs))
  full = np.zeros((len(seqs), width), np.int32)
  for i, seq in enumerate(seqs):
    full[i, :t + len(seq)] = DEC_PROMPTS[0] + seq
  positions = jnp.broadcast_to(jnp.arange(width), full.shape)
  logits, _ = nnx.jit(lambda m, x, p: m(x, positions=p))(decoder, jnp.asarray(full), positions)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  for i, (seq, score) in enumerate(zip(seqs, got)):
    want = sum(float(logp[i, t - 1 + j, tok]) for j, tok in enumerate(seq))
    np.testing.assert_allclose(score, want, atol=1e-4)


def test_decoder_beam_with_k_ge_candidates_equals_exact_scoring(decoder, dec_trie, exhaustive):
  n = len(dec_trie.sequences())
  for row, prompt in enumerate(DEC_PROMPTS):
    exact = bs.score_candidates(decoder, prompt, dec_trie.sequences(), batch_size=4)
    order = np.argsort(-exact)
    assert exhaustive.valid[row].all()
    got = [list(exhaustive.tokens[row, j, :exhaustive.lengths[row, j]]) for j in range(n)]
    assert got == [dec_trie.sequences()[i] for i in order]
    np.testing.assert_allclose(exhaustive.scores[row], exact[order], atol=1e-4)


def test_decoder_beam_small_k_allowed_distinct_sorted(decoder, dec_trie, exhaustive):
  k = 3
  out = bs.beam_search_model(decoder, DEC_PROMPTS, beam_size=k, max_steps=dec_trie.max_depth,
                             stop_tokens=[DEC_END], constraint=dec_trie.to_arrays(),
                             length_bucket=8)
  stored = {tuple(s) for s in dec_trie.sequences()}
  for row, prompt in enumerate(DEC_PROMPTS):
    seqs = [list(out.tokens[row, j, :out.lengths[row, j]]) for j in range(k)]
    assert all(tuple(s) in stored for s in seqs)
    assert len({tuple(s) for s in seqs}) == k
    assert np.all(np.diff(out.scores[row]) <= 0)
    # Each returned score is the sequence's exact log-prob.
    np.testing.assert_allclose(out.log_probs[row],
                               bs.score_candidates(decoder, prompt, seqs), atol=1e-4)
    # Beam search is approximate in general, but its best hypothesis here is the best one.
    assert seqs[0] == list(exhaustive.tokens[row, 0, :exhaustive.lengths[row, 0]])
  # The short (left-padded) prompt alone gives the same result: padding is masked.
  alone = bs.beam_search_model(decoder, DEC_PROMPTS[:1], beam_size=k,
                               max_steps=dec_trie.max_depth, stop_tokens=[DEC_END],
                               constraint=dec_trie.to_arrays(), length_bucket=4)
  np.testing.assert_array_equal(alone.tokens[0], out.tokens[0])
  np.testing.assert_allclose(alone.scores[0], out.scores[0], atol=1e-5)


def test_score_candidates_of_embeddings_equal_tokens_and_share_one_compile(decoder, dec_trie):
  """A soft prompt (embeddings) is left-padded to the length bucket like a token prompt:
  the same scores as the tokens it embeds, and prompts of nearby lengths reuse one compile."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  seqs = dec_trie.sequences()
  embed = nnx.jit(lambda m, x: m.embed(x))
  for prompt in DEC_PROMPTS:
    embeds = embed(decoder, jnp.asarray([prompt], jnp.int32))
    np.testing.assert_allclose(
        bs.score_candidates(decoder, None, seqs, batch_size=3, inputs_embeds=embeds,
                            length_bucket=8),
        bs.score_candidates(decoder, prompt, seqs, batch_size=3, length_bucket=8), atol=1e-4)
  embeds, mask = bs.left_pad_embeds(jnp.ones((1, 5, 4)), 8)
  assert embeds.shape == (1, 8, 4) and mask.tolist() == [[False] * 3 + [True] * 5]
  assert float(jnp.abs(embeds[0, :3]).sum()) == 0.0
  width = embed(decoder, jnp.asarray([DEC_PROMPTS[0]], jnp.int32)).shape[-1]
  sizes = []
  for length in (9, 11, 16):   # one bucket of 16
    bs.score_candidates(decoder, None, seqs, batch_size=3, length_bucket=16,
                        inputs_embeds=jnp.full((1, length, width), 0.01))
    sizes.append(sampler_lib.prefill_jitted._cache_size())
  assert sizes[0] == sizes[1] == sizes[2]
