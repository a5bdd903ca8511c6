"""Token trie over catalogue item titles, for constrained decoding.

Every title is tokenized and terminated by an end-of-answer token (e.g. `<|im_end|>`), so a
title that is a prefix of another ("Alien" / "Aliens") still has its own leaf, and a
sequence is complete exactly when the end token has been emitted.

The trie is stored as flat arrays (one row per edge, sorted by (parent, token)) so that the
allowed-token mask for a whole batch of beams is built with a few vectorized operations,
in numpy on the host or in `jax.numpy` inside a jitted decode loop (`TrieArrays`).

Node 0 is the root. Node ids are dense in [0, num_nodes). The state of a decoding row is the
id of the node it has reached, or -1 once it has left the trie (never happens under the
mask, but a forced token may do it).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

DEAD = -1  # state of a row whose prefix is not in the trie


@flax.struct.dataclass
class TrieArrays:
  """The trie as device arrays (a pytree) for use inside `jax.jit`.

  It implements the decoding-constraint interface of `user_llm_jax.llm.sampler`
  (`init` / `mask` / `update`, state = [B] node ids), so it can be passed directly as the
  `constraint=` of the sampler and of beam search.

  Attributes:
    edge_parent: [num_edges] int32 parent node of each edge (sorted ascending).
    edge_token: [num_edges] int32 token id labelling each edge.
    edge_child: [num_edges] int32 child node of each edge.
    vocab_size: static vocabulary size V of the masks.
  """
  edge_parent: jax.Array
  edge_token: jax.Array
  edge_child: jax.Array
  vocab_size: int = flax.struct.field(pytree_node=False)

  # -- the decoding-constraint interface (see `sampler.Constraint`) ----------------------

  def init(self, batch_size: int) -> jax.Array:
    """Every row starts at the root."""
    return jnp.zeros((batch_size,), jnp.int32)

  def mask(self, state: jax.Array) -> jax.Array:
    return self.allowed_mask(state)

  def update(self, state: jax.Array, tokens: jax.Array) -> jax.Array:
    return self.advance(state, tokens)

  def allowed_mask(self, nodes: jax.Array) -> jax.Array:
    """Dense allowed-token mask for a batch of trie states.

    Args:
      nodes: [B] int32 node ids (DEAD rows get an all-False mask).

    Returns:
      [B, V] bool, True where the token continues the row's prefix inside the trie.
    """
    hit = self.edge_parent[None, :] == nodes[:, None]  # [B, num_edges]
    b = nodes.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], hit.shape)
    cols = jnp.broadcast_to(self.edge_token[None, :], hit.shape)
    mask = jnp.zeros((b, self.vocab_size), bool)
    return mask.at[rows, cols].max(hit)  # [B, V]

  def advance(self, nodes: jax.Array, tokens: jax.Array) -> jax.Array:
    """Follows one edge per row.

    Args:
      nodes: [B] int32 current node ids.
      tokens: [B] int32 emitted tokens.

    Returns:
      [B] int32 child node ids; DEAD where the token is not an edge of the node.
    """
    hit = ((self.edge_parent[None, :] == nodes[:, None])
           & (self.edge_token[None, :] == tokens[:, None]))  # [B, num_edges]
    idx = jnp.argmax(hit, axis=-1)
    return jnp.where(hit.any(axis=-1), self.edge_child[idx], DEAD).astype(jnp.int32)


class TokenTrie:
  """A prefix tree of token sequences (catalogue titles + end token).

  Attributes:
    vocab_size: size of the vocabulary the masks cover.
    end_token: token that terminates every sequence (None: sequences used as given).
    num_nodes: number of nodes including the root.
    max_depth: length of the longest stored sequence (including the end token).
    leaf_items: dict leaf node id -> list of item indices whose title ends there (several
      items share a leaf when their titles tokenize identically).
  """

  def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int, *,
               end_token: int | None = None):
    """Builds the trie.

    Args:
      sequences: token ids of each item (item index = position in this iterable). When
        `end_token` is given it is appended to each sequence that does not already end
        with it.
      vocab_size: V; every token must lie in [0, V).
      end_token: end-of-answer token id, or None.

    Raises:
      ValueError: on an empty sequence, an out-of-range token, or an end token that
        appears inside a sequence (naming the item index).
    """
    self.vocab_size = int(vocab_size)
    self.end_token = end_token
    children: list[dict[int, int]] = [{}]
    self.leaf_items: dict[int, list[int]] = collections.defaultdict(list)
    self.max_depth = 0
    self.num_items = 0
    for item, seq in enumerate(sequences):
      seq = [int(t) for t in seq]
      if end_token is not None and (not seq or seq[-1] != end_token):
        seq.append(int(end_token))
      if not seq:
        raise ValueError(f"item {item}: empty token sequence")
      bad = [t for t in seq if not 0 <= t < self.vocab_size]
      if bad:
        raise ValueError(f"item {item}: token ids {bad[:5]} outside the vocabulary "
                         f"[0, {self.vocab_size})")
      if end_token is not None and end_token in seq[:-1]:
        raise ValueError(f"item {item}: end token {end_token} appears inside the sequence "
                         f"{seq}; it may only terminate it")
      node = 0
      for tok in seq:
        nxt = children[node].get(tok)
        if nxt is None:
          nxt = len(children)
          children[node][tok] = nxt
          children.append({})
        node = nxt
      self.leaf_items[node].append(item)
      self.max_depth = max(self.max_depth, len(seq))
      self.num_items += 1
    if self.num_items == 0:
      raise ValueError("TokenTrie needs at least one sequence")
    self.leaf_items = dict(self.leaf_items)
    self.num_nodes = len(children)
    self._children = children
    # Flat edge arrays sorted by (parent, token): CSR offsets give a node's edges.
    parents, tokens, childs = [], [], []
    for node, kids in enumerate(children):
      for tok in sorted(kids):
        parents.append(node)
        tokens.append(tok)
        childs.append(kids[tok])
    self.edge_parent = np.asarray(parents, np.int32)
    self.edge_token = np.asarray(tokens, np.int32)
    self.edge_child = np.asarray(childs, np.int32)
    self.edge_offsets = np.searchsorted(self.edge_parent, np.arange(self.num_nodes + 1))

  @classmethod
  def from_titles(cls, titles: Sequence[str], encode: Callable[[str], Sequence[int]],
                  vocab_size: int, end_token: int) -> TokenTrie:
    """Tokenizes each title with `encode` (no BOS / special tokens) and appends `end_token`."""
    return cls((encode(t) for t in titles), vocab_size, end_token=end_token)

  # -- host-side queries ------------------------------------------------------------------

  def node_of(self, prefix: Sequence[int]) -> int:
    """Node reached by `prefix` from the root, or DEAD."""
    node = 0
    for tok in prefix:
      node = self._children[node].get(int(tok), DEAD)
      if node == DEAD:
        return DEAD
    return node

  def allowed_next_tokens(self, prefix: Sequence[int]) -> np.ndarray:
    """Sorted token ids that may follow `prefix` (empty when complete or off-trie)."""
    node = self.node_of(prefix)
    if node == DEAD:
      return np.zeros((0,), np.int32)
    lo, hi = self.edge_offsets[node], self.edge_offsets[node + 1]
    return self.edge_token[lo:hi].copy()

  def is_complete(self, prefix: Sequence[int]) -> bool:
    """True when `prefix` is a whole stored sequence (ends at a leaf of an item)."""
    return self.node_of(prefix) in self.leaf_items

  def items_of(self, sequence: Sequence[int]) -> list[int]:
    """Item indices whose (tokenized) title is exactly `sequence` (end token optional)."""
    seq = list(sequence)
    if self.end_token is not None and (not seq or seq[-1] != self.end_token):
      seq.append(self.end_token)
    return list(self.leaf_items.get(self.node_of(seq), []))

  def sequences(self) -> list[list[int]]:
    """All distinct stored sequences, in depth-first token order."""
    out, stack = [], [(0, [])]
    while stack:
      node, prefix = stack.pop()
      if node in self.leaf_items:
        out.append(prefix)
      for tok in sorted(self._children[node], reverse=True):
        stack.append((self._children[node][tok], prefix + [tok]))
    return out

  def allowed_mask(self, nodes: np.ndarray) -> np.ndarray:
    """[B, V] bool allowed-token mask for [B] node ids, vectorized with numpy."""
    nodes = np.asarray(nodes)
    mask = np.zeros((nodes.shape[0], self.vocab_size), bool)
    starts = np.where(nodes >= 0, self.edge_offsets[np.maximum(nodes, 0)], 0)
    ends = np.where(nodes >= 0, self.edge_offsets[np.maximum(nodes, 0) + 1], 0)
    counts = ends - starts
    rows = np.repeat(np.arange(nodes.shape[0]), counts)
    # Edge ids of every row's CSR range, without a Python loop over rows.
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    edges = np.repeat(starts, counts) + within
    mask[rows, self.edge_token[edges]] = True
    return mask

  def to_arrays(self) -> TrieArrays:
    """The trie as a `TrieArrays` pytree of device arrays."""
    return TrieArrays(edge_parent=jnp.asarray(self.edge_parent),
                      edge_token=jnp.asarray(self.edge_token),
                      edge_child=jnp.asarray(self.edge_child),
                      vocab_size=self.vocab_size)
