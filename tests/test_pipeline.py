"""Tests of the record -> example transforms and the Grain input pipeline."""

import json

import grain
import numpy as np
import pytest

from user_llm_jax.data import pipeline
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T


def make_record(user: str, items, ratings=None, timestamps=None, categories=None,
                favorite=schema.PAD_ID) -> dict:
  """A record as `tfds.data_source` returns it (numpy arrays, bytes)."""
  n = len(items)
  ratings = ratings if ratings is not None else [schema.FIRST_ID] * n
  timestamps = timestamps if timestamps is not None else [1000 * i for i in range(n)]
  categories = categories if categories is not None else [[schema.FIRST_ID]] * n
  return {
      schema.USER_ID: user.encode(),
      schema.ITEM_IDS: np.asarray(items, np.int32),
      schema.RATINGS: np.asarray(ratings, np.int32),
      schema.TIMESTAMPS: np.asarray(timestamps, np.int64),
      schema.CATEGORY_IDS: np.asarray([c for cs in categories for c in cs], np.int32),
      schema.CATEGORY_LENGTHS: np.asarray([len(cs) for cs in categories], np.int32),
      schema.REVIEW_TEXTS: np.asarray([b""] * n, dtype=object),
      schema.FAVORITE_CATEGORY: np.int32(favorite),
  }


def numbered_source(n: int) -> list[dict]:
  """Records whose first item id encodes the record index (for order checks)."""
  return [make_record(f"u{i}", [100 + i, 3, 4, 5][: 2 + i % 3]) for i in range(n)]


def first_items(batches) -> list[int]:
  """Record indices of real examples, in batch order."""
  out = []
  for b in batches:
    for item, keep in zip(b[T.INPUTS_ITEM][:, 0], b[T.EXAMPLE_MASK]):
      if keep:
        out.append(int(item) - 100)
  return out


class TestCropAndPad:

  def test_short_record_is_right_padded_and_aligned(self):
    rec = make_record(
        "alice", items=[5, 6, 7], ratings=[2, 3, 4], timestamps=[0, 60, 60 + 3 * 60],
        categories=[[2, 3], [4], [5, 6, 7]], favorite=3)
    ex = T.CropAndPad(max_len=4, max_categories=2).map(rec)
    np.testing.assert_array_equal(ex[T.INPUTS_ITEM], [5, 6, 0, 0])
    np.testing.assert_array_equal(ex[T.TARGETS_ITEM], [6, 7, 0, 0])
    np.testing.assert_array_equal(ex[T.INPUTS_RATING], [2, 3, 0, 0])
    np.testing.assert_array_equal(ex[T.TARGETS_RATING], [3, 4, 0, 0])
    np.testing.assert_array_equal(ex[T.INPUTS_CATEGORY], [[2, 3], [4, 0], [0, 0], [0, 0]])
    # The third event has 3 categories: the first 2 are kept.
    np.testing.assert_array_equal(ex[T.TARGETS_CATEGORY], [[4, 0], [5, 6], [0, 0], [0, 0]])
    np.testing.assert_array_equal(ex[T.MASK], [True, True, False, False])
    assert ex[T.LAST_INDEX] == 1
    assert ex[T.TARGETS_ITEM][ex[T.LAST_INDEX]] == 7  # the record's target event
    assert ex[T.FAVORITE_CATEGORY] == 3 and ex[T.EXAMPLE_MASK]
    # First event: no known gap; 60 s gap = 1 minute -> log2(2) = 1.
    np.testing.assert_array_equal(ex[T.INPUTS_TIME], [schema.OOV_ID, schema.FIRST_ID + 1, 0, 0])
    for key in (T.INPUTS_ITEM, T.INPUTS_TIME, T.TARGETS_CATEGORY, T.LAST_INDEX):
      assert ex[key].dtype == np.int32

  def test_long_record_keeps_most_recent_events(self):
    items = list(range(2, 12))  # 10 events
    rec = make_record("bob", items, timestamps=[0] * 5 + [10 ** 9] * 5)
    ex = T.CropAndPad(max_len=3, max_categories=1).map(rec)
    np.testing.assert_array_equal(ex[T.INPUTS_ITEM], [8, 9, 10])
    np.testing.assert_array_equal(ex[T.TARGETS_ITEM], [9, 10, 11])
    assert ex[T.MASK].all() and ex[T.LAST_INDEX] == 2
    # The first kept event (item 8) still sees its gap to the dropped event before it.
    np.testing.assert_array_equal(ex[T.INPUTS_TIME], [schema.FIRST_ID] * 3)
    huge = T.time_buckets(np.array([0, 5, 10 ** 9], np.int64))
    assert huge[2] == schema.FIRST_ID + 23 and huge[1] == schema.FIRST_ID

  def test_matches_naive_reference_on_random_records(self):
    rng = np.random.default_rng(0)
    crop = T.CropAndPad(max_len=5, max_categories=2)
    for _ in range(30):
      n = int(rng.integers(2, 12))
      cats = [list(rng.integers(2, 9, rng.integers(0, 4))) for _ in range(n)]
      times = np.sort(rng.integers(0, 10 ** 7, n))
      rec = make_record("r", rng.integers(2, 50, n), rng.integers(2, 7, n), times, cats)
      ex = crop.map(rec)
      kept = list(range(max(0, n - 6), n))  # the most recent max_len + 1 events
      for pos, (i, j) in enumerate(zip(kept[:-1], kept[1:])):
        assert ex[T.INPUTS_ITEM][pos] == rec[schema.ITEM_IDS][i]
        assert ex[T.TARGETS_RATING][pos] == rec[schema.RATINGS][j]
        want = (cats[i] + [0, 0])[:2]
        np.testing.assert_array_equal(ex[T.INPUTS_CATEGORY][pos], want)
        np.testing.assert_array_equal(ex[T.TARGETS_CATEGORY][pos], (cats[j] + [0, 0])[:2])
        gap = times[i] - times[i - 1] if i > 0 else None
        want_time = (schema.OOV_ID if gap is None else
                     schema.FIRST_ID + min(int(np.floor(np.log2(1 + gap / 60))), 23))
        assert ex[T.INPUTS_TIME][pos] == want_time
      assert ex[T.MASK].sum() == len(kept) - 1 == ex[T.LAST_INDEX] + 1
      assert (ex[T.INPUTS_ITEM][len(kept) - 1:] == schema.PAD_ID).all()

  def test_exactly_window_plus_one(self):
    ex = T.CropAndPad(max_len=2).map(make_record("c", [2, 3, 4]))
    np.testing.assert_array_equal(ex[T.INPUTS_ITEM], [2, 3])
    assert ex[T.MASK].all() and ex[T.LAST_INDEX] == 1

  def test_dense_categories_vectorized(self):
    out = T.dense_categories(np.array([7, 8, 9, 10], np.int32), np.array([0, 3, 1]), 2)
    np.testing.assert_array_equal(out, [[0, 0], [7, 8], [10, 0]])

  def test_single_event_record_is_an_empty_example(self):
    # A 3-event user's leave-last-out train record: history, no target.
    ex = T.CropAndPad(max_len=4).map(make_record("zoe", [5]))
    assert not ex[T.MASK].any() and not ex[T.EXAMPLE_MASK]
    np.testing.assert_array_equal(ex[T.INPUTS_ITEM], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="'zoe' has no events"):
      T.CropAndPad(max_len=4).map(make_record("zoe", []))

  def test_inconsistent_record_is_an_error(self):
    rec = make_record("yan", [5, 6, 7])
    rec[schema.RATINGS] = np.asarray([2, 3], np.int32)
    with pytest.raises(ValueError, match="'yan'.*'ratings' has 2 entries"):
      T.CropAndPad(max_len=4).map(rec)
    rec = make_record("yan", [5, 6, 7])
    rec[schema.CATEGORY_LENGTHS] = np.asarray([1, 1, 5], np.int32)
    with pytest.raises(ValueError, match="category_lengths"):
      T.CropAndPad(max_len=4).map(rec)
    rec = make_record("yan", [5, 6, 7])
    del rec[schema.TIMESTAMPS]
    with pytest.raises(KeyError, match="no feature 'timestamps'"):
      T.CropAndPad(max_len=4).map(rec)

  def test_invalid_arguments(self):
    with pytest.raises(ValueError, match="max_len"):
      T.CropAndPad(max_len=0)


class TestPipeline:
  TRANSFORMS = (T.CropAndPad(max_len=4, max_categories=2),)

  def train(self, source, seed, **kw):
    kw = {"batch_size": 4, "shuffle": True, "num_epochs": 1, "shard_index": 0,
          "shard_count": 1, "drop_remainder": False, **kw}
    return pipeline.make_pipeline(source, seed=seed, transforms=self.TRANSFORMS, **kw)

  def test_batch_shapes(self):
    batch = next(iter(self.train(numbered_source(10), seed=0)))
    assert batch[T.INPUTS_ITEM].shape == (4, 4)
    assert batch[T.INPUTS_CATEGORY].shape == (4, 4, 2)
    assert batch[T.LAST_INDEX].shape == (4,) and batch[T.EXAMPLE_MASK].all()

  def test_same_seed_same_order_different_seed_different(self):
    src = numbered_source(40)
    a = first_items(self.train(src, seed=3))
    b = first_items(self.train(src, seed=3))
    c = first_items(self.train(src, seed=4))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == list(range(40))  # one epoch: each record once
    assert first_items(self.train(src, seed=0, shuffle=False)) == list(range(40))

  def test_epochs_are_reshuffled(self):
    src = numbered_source(12)
    order = first_items(self.train(src, seed=1, num_epochs=2))
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
    assert order[:12] != order[12:]

  def test_infinite_with_drop_remainder(self):
    it = iter(self.train(numbered_source(10), seed=0, num_epochs=None, drop_remainder=True))
    batches = [next(it) for _ in range(7)]  # more than one epoch's worth
    assert all(b[T.INPUTS_ITEM].shape[0] == 4 for b in batches)

  def test_two_process_shards_partition_the_data(self):
    src = numbered_source(21)
    shards = [first_items(self.train(src, seed=7, shard_index=i, shard_count=2))
              for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(21))

  def test_iterator_state_round_trip(self):
    ds = self.train(numbered_source(30), seed=5, num_epochs=None, drop_remainder=True)
    it = iter(ds)
    next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serializable (Orbax saves it)
    expected = [next(it)[T.INPUTS_ITEM] for _ in range(3)]
    restored = iter(ds)
    restored.set_state(state)
    for want in expected:
      np.testing.assert_array_equal(next(restored)[T.INPUTS_ITEM], want)

  def test_grain_checkpoint_handler_round_trip(self, tmp_path):
    ds = self.train(numbered_source(30), seed=5, num_epochs=None, drop_remainder=True)
    it = iter(ds)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
    want = next(it)[T.INPUTS_ITEM]
    restored = iter(ds)
    handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(restored))
    np.testing.assert_array_equal(next(restored)[T.INPUTS_ITEM], want)

  @pytest.mark.parametrize("num_records,shard_count", [(1, 1), (10, 1), (8, 1), (11, 3),
                                                       (2, 3)])
  def test_eval_padding_keeps_every_example_once(self, num_records, shard_count):
    src = numbered_source(num_records)
    seen, lengths = [], []
    for shard in range(shard_count):
      batches = list(pipeline.make_eval_pipeline(
          src, batch_size=4, transforms=self.TRANSFORMS, shard_index=shard,
          shard_count=shard_count))
      lengths.append(len(batches))
      assert all(b[T.INPUTS_ITEM].shape[0] == 4 for b in batches)
      seen += first_items(batches)
    assert sorted(seen) == list(range(num_records))
    # Every process runs the same number of eval steps.
    want = pipeline.num_eval_batches(num_records, batch_size=4, shard_count=shard_count)
    assert lengths == [want] * shard_count

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="empty"):
      self.train([], seed=0)
    with pytest.raises(ValueError, match="shard_index"):
      self.train(numbered_source(4), seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="finite num_epochs"):
      self.train(numbered_source(4), seed=0, num_epochs=None, pad_to_batch=True)

  def test_bad_record_surfaces_through_pipeline(self):
    src = numbered_source(3) + [make_record("short", [])]
    with pytest.raises(ValueError, match="'short' has no events"):
      list(self.train(src, seed=0, shuffle=False))


_WORKER_SCRIPT = r'''
import sys
import numpy as np
from absl import app
from user_llm_jax.data import pipeline
from user_llm_jax.data import transforms as T

def main(_):
  src = [{"user_id": b"u", "item_ids": np.array([100 + u, 3, 4], np.int32),
          "ratings": np.full(3, 2, np.int32), "timestamps": np.arange(3, dtype=np.int64),
          "category_ids": np.full(3, 2, np.int32), "category_lengths": np.ones(3, np.int32),
          "favorite_category": np.int32(2)} for u in range(50)]
  orders = []
  for workers in (0, 2):
    ds = pipeline.make_pipeline(src, batch_size=4, seed=3, shuffle=True, num_epochs=1,
                                transforms=[T.CropAndPad(4, 2)], shard_index=0, shard_count=1,
                                drop_remainder=False, worker_count=workers)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    tail = list(it)
    resumed = iter(ds)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(tail)
    assert all((a["inputs_item"] == b["inputs_item"]).all() for a, b in zip(tail, again))
    orders.append([int(x) for b in head + tail for x in b["inputs_item"][:, 0]])
  assert orders[0] == orders[1], orders
  assert sorted(orders[0]) == list(range(100, 150))
  print("OK")

if __name__ == "__main__":  # workers are spawned: they re-import this file
  app.run(main)
'''


@pytest.mark.slow
def test_worker_processes_keep_order_and_resume(tmp_path):
  """Two Grain worker processes give the 0-worker order and resume from a saved state.

  Runs in a subprocess under `absl.app.run`, as workers need parsed absl flags.
  """
  import os
  import subprocess
  import sys
  script = tmp_path / "workers.py"
  script.write_text(_WORKER_SCRIPT)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_real_prepared_source(tmp_path):
  """The pipeline over a TFDS array_record source written by data_pipelines.prepare."""
  from data_fixtures import prepare_synthetic

  from user_llm_jax.data import source as source_lib
  from user_llm_jax.eval import popularity

  prepared = prepare_synthetic(tmp_path, window=10, num_users=24, num_items=40)
  train, vocab, _ = source_lib.load_prepared(prepared.path, "train")
  test, _, _ = source_lib.load_prepared(prepared.path, "test")
  crop = T.CropAndPad(max_len=10, max_categories=3)
  batches = list(pipeline.make_eval_pipeline(test, batch_size=5, transforms=[crop],
                                             shard_index=0, shard_count=1))
  assert sum(int(b[T.EXAMPLE_MASK].sum()) for b in batches) == len(test) == 24
  for b in batches:
    assert b[T.INPUTS_CATEGORY].shape == (5, 10, 3)
    assert (b[T.INPUTS_ITEM] < vocab.num_items).all()
    assert (b[T.INPUTS_ITEM][b[T.MASK]] >= schema.OOV_ID).all()
    targets = b[T.TARGETS_ITEM][np.arange(5), b[T.LAST_INDEX]]
    assert (targets[b[T.EXAMPLE_MASK]] != schema.PAD_ID).all()
  # Each test record's target is the last event of the user's whole timeline.
  first = test[0]
  assert batches[0][T.TARGETS_ITEM][0, batches[0][T.LAST_INDEX][0]] == first[schema.ITEM_IDS][-1]
  it = iter(pipeline.make_pipeline(train, batch_size=8, seed=0, shuffle=True, num_epochs=None,
                                   transforms=[crop], shard_index=0, shard_count=1))
  assert next(it)[T.INPUTS_ITEM].shape == (8, 10)
  counts = popularity.fit_item_counts(train, vocab.num_items, show_progress=False)
  assert counts.sum() == sum(len(train[i][schema.ITEM_IDS]) for i in range(len(train)))
