"""Popularity baseline: rank the whole catalogue by training-set item frequency.

Fit: count every item id occurring in the training records (all events of each record,
i.e. the inputs and the targets of training). Under the paper protocol overlapping
windows count an event once per window that contains it, which weights items the same
way the encoder's training data does. Score: the same count vector for every example;
nothing is excluded (not even the example's own history), following the paper's
full-catalogue protocol, and ties go to the smaller item id as in `retrieval`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
