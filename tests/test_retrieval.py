"""Tests of full-catalogue retrieval metrics and the popularity baseline."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax.data import pipeline
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.eval import popularity, retrieval

NEG = -np.inf
# Items 0 (PAD) and 1 (OOV) are never ranked; items 2 and 4 tie at the top.
SCORES = np.array([NEG, NEG, 0.9, 0.3, 0.9, 0.2], np.float32)


def eval_batch(targets, example_mask=None, scores=None) -> dict:
  """A batch whose record targets sit at different `last_index` positions."""
  b = len(targets)
  targets_item = np.zeros((b, 3), np.int32)
  last = np.arange(b, dtype=np.int32) % 3
  targets_item[np.arange(b), last] = targets
  batch = {T.TARGETS_ITEM: targets_item, T.LAST_INDEX: last,
           T.EXAMPLE_MASK: np.ones(b, bool) if example_mask is None else
           np.asarray(example_mask, bool)}
  if scores is not None:
    batch["scores"] = np.broadcast_to(scores, (b, scores.size)).copy()
  return batch


def scores_from_batch(static, params, batch):
  """Scorer reading fixed scores from the batch (the metric code is what is tested)."""
  del static, params
  return batch["scores"]


class TestRanks:

  def test_hand_computed_ranks_with_ties_and_oov(self):
    targets = jnp.array([2, 4, 3, 5, 1, 0, 99])
    ranks = retrieval.target_ranks(jnp.broadcast_to(jnp.asarray(SCORES), (7, 6)), targets)
    # 2 wins the tie with 4 (smaller id); OOV, PAD and out-of-range are misses.
    miss = retrieval.MISS_RANK
    np.testing.assert_array_equal(ranks, [0, 1, 2, 3, miss, miss, miss])

  def test_constant_scores_rank_by_id(self):
    ranks = retrieval.target_ranks(jnp.zeros((3, 10)), jnp.array([2, 5, 9]))
    np.testing.assert_array_equal(ranks, [2, 5, 9])

  def test_metric_formulas(self):
    ranks = np.array([0, 1, 2, 3, retrieval.MISS_RANK])
    np.testing.assert_array_equal(retrieval.recall_at_k(ranks, 1), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(retrieval.recall_at_k(ranks, 5), [1, 1, 1, 1, 0])
    np.testing.assert_allclose(retrieval.ndcg_at_k(ranks, 3),
                               [1, 1 / math.log2(3), 0.5, 0, 0])

  def test_accumulator_respects_example_mask(self):
    acc = retrieval.RetrievalAccumulator()
    acc.add(np.array([0, 7, 20]), np.array([True, True, False]))
    acc.add(np.array([3]))
    out = acc.result()
    assert out["num_examples"] == 3
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@5"] == pytest.approx(2 / 3)
    assert out["recall@10"] == pytest.approx(1.0)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(9) + 1 / math.log2(5)) / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 8 + 1 / 4) / 3)
    with pytest.raises(ValueError, match="example_mask"):
      acc.add(np.array([1, 2]), np.array([True]))

  def test_empty_accumulator(self):
    assert retrieval.RetrievalAccumulator().result()["num_examples"] == 0

  def test_evaluate_scores_over_batches(self):
    batches = [eval_batch([2, 4, 3], scores=SCORES),
               eval_batch([5, 1, 2], example_mask=[True, True, False], scores=SCORES)]
    out = retrieval.evaluate_scores(scores_from_batch, None, None, batches)
    # Ranks 0, 1, 2, 3 and a miss (OOV target 1); the padded example is ignored.
    assert out["num_examples"] == 5
    assert out["recall@1"] == pytest.approx(1 / 5)
    assert out["recall@5"] == pytest.approx(4 / 5)
    assert out["recall@10"] == pytest.approx(4 / 5)
    want_ndcg = (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)) / 5
    assert out["ndcg@10"] == pytest.approx(want_ndcg)


class TestPopularity:
  RECORDS = [{"item_ids": np.array([2, 3, 3])}, {"item_ids": np.array([3, 4])},
             {"item_ids": np.array([5, 2, 3])}]

  def test_counts_and_metrics(self):
    counts = popularity.fit_item_counts(self.RECORDS, num_items=7, show_progress=False)
    np.testing.assert_array_equal(counts, [0, 0, 2, 4, 1, 1, 0])
    # Order: 3 (4), 2 (2), 4 and 5 tie at 1 (4 first), 6 (0).
    batches = [eval_batch([3, 5, 6]), eval_batch([1, 2], example_mask=[True, False])]
    out = popularity.evaluate_popularity(counts, batches)
    assert out["num_examples"] == 4
    assert out["recall@1"] == pytest.approx(1 / 4)        # target 3
    assert out["recall@5"] == pytest.approx(3 / 4)        # 3, 5 (rank 3), 6 (rank 4)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(6)) / 4)

  def test_bad_item_id(self):
    with pytest.raises(ValueError, match="record 1: item id 9 outside"):
      popularity.fit_item_counts([{"item_ids": [2]}, {"item_ids": [9]}], 7,
                                 show_progress=False)


def test_evaluate_next_item_matches_numpy_ranking():
  cfg = ENCODER_TINY.replace(max_len=4, max_categories=2)
  model = UserEncoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  records = []
  for i in range(11):
    n = 2 + i % 5
    items = rng.integers(2, cfg.num_items, n)
    if i == 3:
      items[-1] = 1  # an OOV target: must count as a miss
    records.append({"user_id": b"u", "item_ids": items, "ratings": np.full(n, 2),
                    "timestamps": np.arange(n) * 100, "category_ids": np.full(n, 3),
                    "category_lengths": np.ones(n, np.int32), "favorite_category": 3})
  transforms = [T.CropAndPad(cfg.max_len, cfg.max_categories)]
  batches = list(pipeline.make_eval_pipeline(records, batch_size=4, transforms=transforms))
  out = retrieval.evaluate_next_item(model, batches)

  want = []
  logits_fn = nnx.jit(lambda m, b: m.next_item_logits(b))
  for b in batches:
    scores = np.asarray(logits_fn(model, {k: v for k, v in b.items()}))
    assert np.isneginf(scores[:, :2]).all() and np.isfinite(scores[:, 2:]).all()
    targets = retrieval.last_targets(b)
    for s, t, keep in zip(scores, targets, b[T.EXAMPLE_MASK]):
      if keep:
        order = sorted(range(2, cfg.num_items), key=lambda j: (-s[j], j))
        want.append(order.index(t) if t >= 2 else retrieval.MISS_RANK)
  want = np.array(want)
  assert out["num_examples"] == 11
  assert out["recall@10"] == pytest.approx(np.mean(want < 10))
  assert out["recall@1"] == pytest.approx(np.mean(want < 1))
  assert out["ndcg@10"] == pytest.approx(float(np.mean(retrieval.ndcg_at_k(want, 10))))


def test_first_order_baseline_matches_brute_force_ranking():
  """Transition counts from the context's last item, popularity breaking ties, PAD/OOV
  never ranked: the baseline's metrics equal a brute-force ranking of the same rule."""
  num_items = 9
  rng = np.random.default_rng(3)
  train = [{"item_ids": rng.integers(2, num_items, 2 + i % 6)} for i in range(12)]
  model = popularity.FirstOrder(train, num_items)
  # Hand check of one row: how often each item follows item 2 in the training records.
  follows = np.zeros(num_items)
  pop = np.zeros(num_items)
  for r in train:
    items = list(r["item_ids"])
    for a, b in zip(items[:-1], items[1:]):
      follows[b] += a == 2
    for i in items:
      pop[i] += 1
  assert model.transition_scores(np.array([2]))[0].tolist() == follows.tolist()

  test = []
  for i in range(10):
    n = 2 + i % 4
    items = rng.integers(2, num_items, n)
    if i == 4:
      items[-1] = 1   # an OOV target: a miss
    test.append({"user_id": b"u", "item_ids": items, "ratings": np.full(n, 2),
                 "timestamps": np.arange(n) * 100, "category_ids": np.full(n, 3),
                 "category_lengths": np.ones(n, np.int32), "favorite_category": 3})
  batches = list(pipeline.make_eval_pipeline(test, batch_size=4,
                                             transforms=[T.CropAndPad(6, 2)]))
  out = popularity.evaluate_first_order(model, batches)

  counts = {}
  for r in train:
    items = list(r["item_ids"])
    for a, b in zip(items[:-1], items[1:]):
      counts[(a, b)] = counts.get((a, b), 0) + 1
  want = []
  for r in test:
    prev, target = int(r["item_ids"][-2]), int(r["item_ids"][-1])
    key = lambda j: (-(counts.get((prev, j), 0) + pop[j] / (pop.max() + 1)), j)  # pylint: disable=cell-var-from-loop
    order = sorted(range(2, num_items), key=key)
    want.append(order.index(target) if target >= 2 else retrieval.MISS_RANK)
  want = np.array(want)
  assert out["num_examples"] == 10
  for k in (1, 5):
    assert out[f"recall@{k}"] == pytest.approx(np.mean(want < k))
  assert out["ndcg@10"] == pytest.approx(float(np.mean(retrieval.ndcg_at_k(want, 10))))
  assert len(set(want.tolist())) > 2   # the rule separates examples here
