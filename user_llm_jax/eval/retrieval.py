"""Full-catalogue next-item retrieval metrics: Recall@K and NDCG@K.

Protocol: every example has exactly one relevant item (its target); the model scores the
whole catalogue (no sampled negatives) and the target's 0-based rank is

  rank = #{items scoring higher} + #{items scoring equal with a smaller id}

i.e. ties are broken deterministically by item id, as a stable descending sort by score
would (a constant scorer ranks items in id order). Recall@K = [rank < K],
NDCG@K = [rank < K] / log2(rank + 2) (the ideal DCG of one relevant item is 1).
A target that cannot be ranked (PAD, OOV, or outside the vocabulary) counts as a miss
(rank = `MISS_RANK`, beyond every cut-off even for a catalogue smaller than K): it stays
in the denominator, never dropped. Padding examples
(`example_mask` False) are excluded.

Seen items: by default nothing is excluded (the paper's and RecBole's default protocol).
With `exclude_seen` the eval examples carry `seen_items` (bool[V], every item of the
record before its target, added by `WithSeenItems`) and those items score -inf before
ranking, so the target competes only with items the user has not had; a target the user
had already had is itself excluded and counts as a miss. Every report names the protocol
(`protocol_name`).

Axis letters: B batch, V items.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from user_llm_jax import distributed
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.eval import paired

DEFAULT_KS = (1, 5, 10)
MISS_RANK = np.iinfo(np.int32).max
NDCG_K = 10
SEEN_ITEMS = "seen_items"

ScoreFn = Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]


def target_ranks(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """0-based rank of each target among all items (see the module docstring for ties).

  Args:
    scores: [B, V] item scores (reserved columns may be -inf).
    targets: int[B] target item ids.

  Returns:
    int32[B] ranks; `MISS_RANK` for a target that is PAD, OOV or out of range.
  """
  num_items = scores.shape[-1]
  valid = (targets >= schema.FIRST_ID) & (targets < num_items)
  safe = jnp.where(valid, targets, schema.FIRST_ID)
  target_score = jnp.take_along_axis(scores, safe[:, None], axis=-1)      # [B, 1]
  ids = jnp.arange(num_items)[None, :]                                    # [1, V]
  ahead = (scores > target_score) | ((scores == target_score) & (ids < safe[:, None]))
  ranks = jnp.sum(ahead, axis=-1, dtype=jnp.int32)                        # [B]
  return jnp.where(valid, ranks, MISS_RANK).astype(jnp.int32)


def exclude_seen(scores: jax.Array, seen: jax.Array) -> jax.Array:
  """[B, V] scores with the items of bool[B, V] `seen` at -inf (below every unseen item)."""
  return jnp.where(seen, -jnp.inf, scores)


def protocol_name(exclude: bool) -> str:
  """How a report names the seen-items protocol."""
  return "seen items excluded" if exclude else "seen items not excluded"


@dataclasses.dataclass(frozen=True)
class WithSeenItems(grain.transforms.Map):
  """Record -> `crop`'s example plus `seen_items`: bool[num_items], the record's items
  before its target (reserved ids and ids outside the vocabulary are never marked).

  Attributes:
    crop: the example transform (`data.transforms.CropAndPad`).
    num_items: item vocabulary size V.
  """

  crop: Any
  num_items: int

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    example = self.crop.map(element)
    history = np.asarray(element[schema.ITEM_IDS], np.int64).reshape(-1)[:-1]
    history = history[(history >= schema.FIRST_ID) & (history < self.num_items)]
    seen = np.zeros((self.num_items,), bool)
    seen[history] = True
    example[SEEN_ITEMS] = seen
    return example


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
  """Per-example Recall@k (0 or 1) from 0-based target ranks."""
  return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
  """Per-example NDCG@k with a single relevant item: 1 / log2(rank + 2) inside the top k."""
  ranks = np.asarray(ranks, np.float64)
  return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


class RetrievalAccumulator:
  """Accumulates target ranks over batches and reports the metrics.

  Args:
    ks: cut-offs reported as `recall@k`.
    ndcg_k: cut-off of the reported `ndcg@{ndcg_k}`.
  """

  def __init__(self, ks: Sequence[int] = DEFAULT_KS, ndcg_k: int = NDCG_K):
    self.ks = tuple(ks)
    self.ndcg_k = ndcg_k
    self._ranks: list[np.ndarray] = []

  def add(self, ranks: Any, example_mask: Any | None = None) -> None:
    """Adds a batch of ranks; entries with `example_mask` False are ignored."""
    ranks = np.asarray(ranks).reshape(-1)
    if example_mask is not None:
      example_mask = np.asarray(example_mask, bool).reshape(-1)
      if example_mask.shape != ranks.shape:
        raise ValueError(f"example_mask has shape {example_mask.shape}, ranks {ranks.shape}")
      ranks = ranks[example_mask]
    self._ranks.append(ranks)

  @property
  def ranks(self) -> np.ndarray:
    return np.concatenate(self._ranks) if self._ranks else np.zeros((0,), np.int64)

  def result(self, ids: Sequence[int] | None = None) -> dict[str, Any]:
    """`recall@k` for each k, `ndcg@{ndcg_k}`, `mrr`, the standard error of each mean
    (`<metric>_stderr`, over examples) and `num_examples`; with `ids` (one per ranked
    example, in order) also each example's values (`paired.PER_EXAMPLE`)."""
    ranks = self.ranks
    n = ranks.size
    values = {f"recall@{k}": recall_at_k(ranks, k) for k in self.ks}
    values[f"ndcg@{self.ndcg_k}"] = ndcg_at_k(ranks, self.ndcg_k)
    values["mrr"] = 1.0 / (ranks + 1.0)
    out: dict[str, Any] = {}
    for key, vals in values.items():
      out[key] = float(np.mean(vals)) if n else 0.0
      out[f"{key}_stderr"] = float(np.std(vals, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    out["num_examples"] = int(n)
    if ids is not None:
      if len(ids) != n:
        raise ValueError(f"{len(ids)} example ids for {n} ranked examples")
      out[paired.PER_EXAMPLE] = paired.per_example(
          ids, {k: v for k, v in values.items() if k != "mrr"})
    return out


def last_targets(batch: Mapping[str, Any]) -> np.ndarray:
  """The record target of each example: `targets_item[b, last_index[b]]`."""
  targets = np.asarray(batch[T.TARGETS_ITEM])
  last = np.asarray(batch[T.LAST_INDEX]).astype(np.int64)
  return targets[np.arange(targets.shape[0]), last]


def _target_at_last(batch: Mapping[str, jax.Array]) -> jax.Array:
  return jnp.take_along_axis(batch[T.TARGETS_ITEM], batch[T.LAST_INDEX][:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_ranks(score_fn: ScoreFn, static: Any, params: Any,
                 batch: Mapping[str, jax.Array]) -> jax.Array:
  # Module-level and keyed by the static (score_fn, static) pair, so repeated evaluations
  # of the same model structure reuse one compiled executable.
  scores = score_fn(static, params, batch)                                # [B, V]
  targets = _target_at_last(batch)                                        # [B]
  if SEEN_ITEMS not in batch:  # A static choice: the batch's keys are part of the trace.
    return target_ranks(scores, targets)
  seen = batch[SEEN_ITEMS]                                                # [B, V]
  ranks = target_ranks(exclude_seen(scores, seen), targets)
  safe = jnp.clip(targets, 0, seen.shape[-1] - 1)
  seen_target = jnp.take_along_axis(seen, safe[:, None], axis=-1)[:, 0]   # [B]
  return jnp.where(seen_target, MISS_RANK, ranks)


def evaluate_scores(score_fn: ScoreFn, static: Any, params: Any,
                    batches: Iterable[Mapping[str, Any]], *, ks: Sequence[int] = DEFAULT_KS,
                    ndcg_k: int = NDCG_K, desc: str = "eval",
                    ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Ranks each batch's targets under a jitted scorer and reports the metrics.

  Args:
    score_fn: `(static, params, batch) -> [B, V]` scores over the whole catalogue; a
      module-level function (hashable), as is `static` (e.g. an `nnx.GraphDef`).
    static: hashable, compile-time context of `score_fn`.
    params: array pytree passed to `score_fn` (traced, not baked into the executable).
    batches: eval batches (`data.pipeline.make_eval_pipeline`); with `seen_items`, those
      items are excluded from the ranking.
    ks: Recall cut-offs.
    ndcg_k: NDCG cut-off.
    desc: progress-bar label.
    ids: one identifier per (unmasked) example, in batch order (e.g. the test record
      index): the result then keeps each example's values (`paired.PER_EXAMPLE`).

  Returns:
    The `RetrievalAccumulator.result()` dict.
  """
  acc = RetrievalAccumulator(ks, ndcg_k)
  # Several processes: each reads its shard; ranks and masks of all are gathered to each.
  hosts = distributed.HostBatches.for_params(params)
  for batch in tqdm.tqdm(batches, desc=desc, unit="batch", leave=False):
    arrays = hosts.place({k: np.asarray(v) for k, v in batch.items()
                          if np.asarray(v).dtype.kind in "biuf"})
    acc.add(*hosts.gather(_batch_ranks(score_fn, static, hosts.params, arrays),
                          arrays.get(T.EXAMPLE_MASK)))
  return acc.result(ids)


def _model_scores(graphdef: nnx.GraphDef, state: Any,
                  batch: Mapping[str, jax.Array]) -> jax.Array:
  return nnx.merge(graphdef, state).next_item_logits(batch)


def evaluate_next_item(model: nnx.Module, batches: Iterable[Mapping[str, Any]], *,
                       ks: Sequence[int] = DEFAULT_KS, ndcg_k: int = NDCG_K,
                       ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Next-item metrics of a model with `next_item_logits(batch) -> [B, V]`.

  Returns:
    `recall@1`, `recall@5`, `recall@10`, `ndcg@10`, `mrr` (each with `<metric>_stderr`),
    `num_examples` (and the per-example values with `ids`, see `evaluate_scores`).
  """
  graphdef, state = nnx.split(model)
  return evaluate_scores(_model_scores, graphdef, state, batches, ks=ks, ndcg_k=ndcg_k,
                         desc="eval next item", ids=ids)
