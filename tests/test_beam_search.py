"""Tests for constrained beam search (toy bigram decoder and the real tiny Decoder)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from user_llm_jax.llm import beam_search as bs
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
