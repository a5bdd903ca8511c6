"""Popularity baseline: rank the whole catalogue by training-set item frequency.

Fit: count every item id occurring in the training records (all events of each record,
i.e. the inputs and the targets of training). Under the paper protocol overlapping
windows count an event once per window that contains it, which weights items the same
way the encoder's training data does. Score: the same count vector for every example;
nothing is excluded (not even the example's own history), following the paper's
full-catalogue protocol, and ties go to the smaller item id as in `retrieval`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.eval import retrieval


def fit_item_counts(records: Iterable[Mapping[str, Any]], num_items: int, *,
                    show_progress: bool = True) -> np.ndarray:
  """Counts item ids over training records.

  Args:
    records: training records (a `tfds.data_source`, `ListSource` or list of dicts with
      `item_ids`).
    num_items: item vocabulary size (including PAD and OOV).
    show_progress: display a progress bar.

  Returns:
    int64[num_items] occurrence counts.

  Raises:
    ValueError: if a record holds an id outside [0, num_items).
  """
  counts = np.zeros((num_items,), np.int64)
  total = len(records) if hasattr(records, "__len__") else None
  stream = records
  if total is not None and hasattr(records, "__getitem__"):
    # Random-access sources (tfds.data_source) are read by index.
    stream = (records[i] for i in range(total))
  for index, record in enumerate(tqdm.tqdm(stream, total=total, desc="popularity",
                                           unit="record", disable=not show_progress)):
    if schema.ITEM_IDS not in record:
      raise KeyError(f"training record {index} has no {schema.ITEM_IDS!r}; found "
                     f"{sorted(record)}")
    items = np.asarray(record[schema.ITEM_IDS], np.int64).reshape(-1)
    if items.size and (items.min() < 0 or items.max() >= num_items):
      raise ValueError(f"training record {index}: item id {int(items.max())} outside the "
                       f"vocabulary [0, {num_items}); does num_items match the dataset?")
    counts += np.bincount(items, minlength=num_items)
  return counts


def popularity_scores(counts: np.ndarray) -> np.ndarray:
  """float32[V] scores: counts, with PAD and OOV at -inf (never ranked)."""
  scores = np.asarray(counts, np.float32).copy()
  scores[:schema.FIRST_ID] = -np.inf
  return scores


def _broadcast_scores(static: None, scores: jax.Array,
                      batch: Mapping[str, jax.Array]) -> jax.Array:
  del static
  batch_size = batch[T.LAST_INDEX].shape[0]
  return jnp.broadcast_to(scores[None, :], (batch_size, scores.shape[0]))  # [B, V]


def evaluate_popularity(counts: np.ndarray, batches: Iterable[Mapping[str, Any]], *,
                        ks: Sequence[int] = retrieval.DEFAULT_KS,
                        ndcg_k: int = retrieval.NDCG_K,
                        ids: Sequence[int] | None = None) -> dict[str, Any]:
  """The popularity baseline's next-item metrics on eval batches.

  Returns:
    The same keys as `retrieval.evaluate_next_item` (`recall@1/5/10`, `ndcg@10`, `mrr`,
    `num_examples`).
  """
  return retrieval.evaluate_scores(
      _broadcast_scores, None, jnp.asarray(popularity_scores(counts)), batches, ks=ks,
      ndcg_k=ndcg_k, desc="eval popularity", ids=ids)


class FirstOrder:
  """First-order transition baseline: score item j after item i by how often j follows i
  in the training records (any user), popularity breaking ties (and ranking alone after an
  item never followed by anything). The classic Markov-chain ranker: what a sequence model
  gives beyond it is what it learned beyond repeating seen transitions.

  The counts are kept sparse (one sorted array of distinct pairs), so catalogues of any
  size fit; scores are built on the host per eval batch.
  """

  def __init__(self, records: Any, num_items: int):
    codes = [transition_codes(records[i][schema.ITEM_IDS], num_items)
             for i in range(len(records))]
    pairs, counts = np.unique(np.concatenate(codes) if codes else np.zeros(0, np.int64),
                              return_counts=True)
    self.num_items = num_items
    self.pairs = pairs   # the distinct training transitions, sorted (`transition_codes`)
    self.targets = (pairs % num_items).astype(np.int64)
    self.counts = counts.astype(np.float32)
    # Pairs are sorted by source item: row i is targets[indptr[i]:indptr[i + 1]].
    self.indptr = np.searchsorted(pairs // num_items, np.arange(num_items + 1))
    pop = fit_item_counts(records, num_items, show_progress=False).astype(np.float32)
    self.tiebreak = pop / (pop.max() + 1.0)   # < 1: never outweighs one transition

  def transition_scores(self, previous: np.ndarray) -> np.ndarray:
    """float32[B, V]: each example's transition counts from its `previous` item."""
    out = np.zeros((len(previous), self.num_items), np.float32)
    for b, item in enumerate(np.asarray(previous, np.int64)):
      lo, hi = self.indptr[item], self.indptr[item + 1]
      out[b, self.targets[lo:hi]] = self.counts[lo:hi]
    return out


def transition_codes(items: Any, num_items: int) -> np.ndarray:
  """Each consecutive pair (a, b) of a record's item ids as the integer a * num_items + b."""
  items = np.asarray(items, np.int64).reshape(-1)
  return items[:-1] * num_items + items[1:]


FIRST_ORDER_SCORES = "first_order_scores"


def _first_order_scores(static: None, tiebreak: jax.Array,
                        batch: Mapping[str, jax.Array]) -> jax.Array:
  del static
  scores = batch[FIRST_ORDER_SCORES] + tiebreak[None, :]
  return scores.at[:, :schema.FIRST_ID].set(-jnp.inf)   # PAD and OOV never ranked


def evaluate_first_order(model: FirstOrder, batches: Iterable[Mapping[str, Any]], *,
                         ks: Sequence[int] = retrieval.DEFAULT_KS,
                         ndcg_k: int = retrieval.NDCG_K) -> dict[str, Any]:
  """The first-order baseline's next-item metrics on eval batches (each example's
  previous item is its context's last input, `inputs_item[last_index]`)."""
  return retrieval.evaluate_scores(
      _first_order_scores, None, jnp.asarray(model.tiebreak),
      with_transition_scores(model, batches), ks=ks, ndcg_k=ndcg_k,
      desc="eval first-order")


def with_transition_scores(model: FirstOrder, batches: Iterable[Mapping[str, Any]]
                           ) -> Iterator[dict[str, Any]]:
  """Eval batches with `FIRST_ORDER_SCORES`: each example's transition counts from its
  context's last input item (`inputs_item[last_index]`)."""
  for batch in batches:
    rows = np.arange(np.asarray(batch[T.LAST_INDEX]).shape[0])
    previous = np.asarray(batch[T.INPUTS_ITEM])[rows, np.asarray(batch[T.LAST_INDEX])]
    yield {**batch, FIRST_ORDER_SCORES: model.transition_scores(previous)}
