"""Tests for the catalogue-title token trie."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from user_llm_jax.llm import trie as trie_lib

END = 256  # byte-level "tokenizer": bytes 0..255, end-of-answer token 256
VOCAB = 257


def _encode(text: str) -> list[int]:
  return list(text.encode("utf-8"))


TITLES = ["Alien", "Aliens", "Amelie", "Heat", "Heat", "Up"]


@pytest.fixture(scope="module")
def trie() -> trie_lib.TokenTrie:
  return trie_lib.TokenTrie.from_titles(TITLES, _encode, VOCAB, END)


def test_allowed_next_tokens_follow_titles(trie):
  assert sorted(trie.allowed_next_tokens([])) == sorted({ord("A"), ord("H"), ord("U")})
  assert list(trie.allowed_next_tokens(_encode("Al"))) == [ord("i")]
  assert list(trie.allowed_next_tokens(_encode("Ali"))) == [ord("e")]
  # "Alien" is complete and also a prefix of "Aliens": both the end token and "s" allowed.
  assert sorted(trie.allowed_next_tokens(_encode("Alien"))) == [ord("s"), END]
  assert list(trie.allowed_next_tokens(_encode("Alien") + [END])) == []
  assert list(trie.allowed_next_tokens(_encode("Alx"))) == []


def test_completion_and_items(trie):
  assert trie.is_complete(_encode("Alien") + [END])
  assert not trie.is_complete(_encode("Alien"))
  assert trie.items_of(_encode("Aliens")) == [1]
  # Duplicate titles share a leaf; both item indices are kept.
  assert trie.items_of(_encode("Heat")) == [3, 4]
  assert trie.num_items == 6
  assert trie.max_depth == len("Aliens") + 1
  seqs = trie.sequences()
  assert len(seqs) == 5  # "Heat" stored once
  assert sorted(bytes(s[:-1]).decode() for s in seqs) == sorted(set(TITLES))
  assert all(s[-1] == END for s in seqs)


def test_numpy_and_jax_masks_agree_for_a_batch(trie):
  prefixes = [[], _encode("A"), _encode("Alien"), _encode("Heat") + [END], _encode("Zzz")]
  nodes = np.asarray([trie.node_of(p) for p in prefixes], np.int32)
  assert nodes[-1] == trie_lib.DEAD
  np_mask = trie.allowed_mask(nodes)
  arrays = trie.to_arrays()
  jax_mask = np.asarray(jax.jit(arrays.allowed_mask)(jnp.asarray(nodes)))
  np.testing.assert_array_equal(np_mask, jax_mask)
  for row, prefix in enumerate(prefixes):
    expect = np.zeros(VOCAB, bool)
    expect[trie.allowed_next_tokens(prefix)] = True
    np.testing.assert_array_equal(np_mask[row], expect)


def test_jax_advance_walks_the_trie(trie):
  arrays = trie.to_arrays()
  words = ["Amelie", "Up", "Aliens"]
  length = max(map(len, words))
  state = arrays.init(len(words))
  step = jax.jit(arrays.update)
  for i in range(length):
    toks = jnp.asarray([_encode(w)[i] if i < len(w) else END for w in words], jnp.int32)
    state = step(state, toks)
  # "Up<end>" reached its leaf early; the next END left the trie.
  expect = [trie.node_of(_encode("Amelie")), trie_lib.DEAD,
            trie.node_of(_encode("Aliens"))]
  np.testing.assert_array_equal(np.asarray(state), expect)
  state = step(state, jnp.full((3,), END, jnp.int32))
  assert trie.leaf_items[int(state[0])] == [2]
  assert trie.leaf_items[int(state[2])] == [1]
  bad = step(jnp.zeros((1,), jnp.int32), jnp.asarray([ord("Q")], jnp.int32))
  assert int(bad[0]) == trie_lib.DEAD


def test_trie_is_a_jit_argument(trie):
  arrays = trie.to_arrays()
  count = jax.jit(lambda t, n: t.mask(n).sum())(arrays, jnp.zeros((2,), jnp.int32))
  assert int(count) == 2 * 3


@pytest.mark.parametrize("seqs,match", [
    ([[1, 2], []], "item 1: empty"),
    ([[1, 300]], "item 0: token ids \\[300\\] outside"),
    ([[1, END, 2]], "item 0: end token 256 appears inside"),
    ([], "at least one"),
])
def test_bad_input_is_a_clear_error(seqs, match):
  with pytest.raises(ValueError, match=match):
    trie_lib.TokenTrie(seqs, VOCAB, end_token=END if seqs != [[1, 2], []] else None)
