"""Excluding the user's already-seen items from the ranking: hand-computed cases."""

import math

import numpy as np
import pytest

from user_llm_jax.data import pipeline
from user_llm_jax.data import transforms as T
from user_llm_jax.eval import popularity, retrieval

NEG = -np.inf
# Items 2..5 (0 PAD and 1 OOV never ranked): order without exclusion 2, 4, 3, 5
# (2 and 4 tie at .9; the smaller id wins).
SCORES = np.array([NEG, NEG, 0.9, 0.3, 0.9, 0.2], np.float32)
NUM_ITEMS = SCORES.size


def record(items) -> dict:
  n = len(items)
  return {"user_id": b"u", "item_ids": np.asarray(items), "ratings": np.full(n, 2),
          "timestamps": np.arange(n) * 60, "category_ids": np.full(n, 2),
          "category_lengths": np.ones(n, np.int32), "favorite_category": 2}


def fixed_scores(static, params, batch):
  del static, params
  return np.broadcast_to(SCORES, (batch[T.LAST_INDEX].shape[0], NUM_ITEMS))


def batches(records, exclude: bool):
  crop = T.CropAndPad(4, 1)
  transform = retrieval.WithSeenItems(crop, NUM_ITEMS) if exclude else crop
  return list(pipeline.make_eval_pipeline(records, batch_size=2, transforms=[transform]))


# User a: history [4, 3], target 5. User b: history [2], target 4.
# User c: history [2, 3], target 2 (had before).
RECORDS = [record([4, 3, 5]), record([2, 4]), record([2, 3, 2])]


def test_seen_items_mark_the_history_before_the_target():
  ex = retrieval.WithSeenItems(T.CropAndPad(4, 1), NUM_ITEMS).map(record([4, 3, 1, 5]))
  # OOV (1) is never marked; the target 5 is not part of the history.
  np.testing.assert_array_equal(ex[retrieval.SEEN_ITEMS], [0, 0, 0, 1, 1, 0])


def test_hand_computed_ranks_with_and_without_exclusion():
  kept = retrieval.evaluate_scores(fixed_scores, None, None, batches(RECORDS, False))
  # Not excluded: a's 5 at rank 3, b's 4 at rank 1, c's 2 at rank 0.
  assert kept["recall@1"] == pytest.approx(1 / 3)
  assert kept["ndcg@10"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(3) + 1) / 3)
  excluded = retrieval.evaluate_scores(fixed_scores, None, None, batches(RECORDS, True))
  # Excluded: a ranks among {2, 5}: rank 1; b among {3, 4, 5}: 4 first, rank 0;
  # c's target 2 was seen: a miss even in this 4-item catalogue.
  assert excluded["num_examples"] == 3
  assert excluded["recall@1"] == pytest.approx(1 / 3)
  assert excluded["recall@5"] == pytest.approx(2 / 3)
  assert excluded["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 3)
  assert excluded["mrr"] == pytest.approx((1 / 2 + 1) / 3)


def test_popularity_with_exclusion():
  counts = np.array([0, 0, 1, 5, 3, 2])   # order 3, 4, 5, 2
  out = popularity.evaluate_popularity(counts, batches(RECORDS, True))
  # a: {2, 5} -> 5 first, rank 0; b: {3, 4, 5} -> 4 at rank 1; c: seen target, miss.
  assert out["recall@1"] == pytest.approx(1 / 3)
  assert out["recall@5"] == pytest.approx(2 / 3)
  assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


def test_standard_errors_of_the_means():
  acc = retrieval.RetrievalAccumulator(ks=(1,))
  acc.add(np.array([0, 3, 0, 12]))
  out = acc.result()
  assert out["recall@1"] == 0.5
  # Sample standard deviation of [1, 0, 1, 0] is sqrt(1/3); over sqrt(4).
  assert out["recall@1_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
  assert out["ndcg@10_stderr"] == pytest.approx(
      np.std([1, 1 / math.log2(5), 1, 0], ddof=1) / 2)
