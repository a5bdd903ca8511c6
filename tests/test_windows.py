"""Random training windows over a user's whole history (`data.windows`)."""

import numpy as np
import pytest

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.data import windows


def record(n: int, user: bytes = b"u") -> dict:
  items = np.arange(100, 100 + n)
  lengths = np.arange(n) % 3                       # 0, 1 or 2 categories per event
  cats = np.concatenate([np.full(k, 10 + i) for i, k in enumerate(lengths)]).astype(np.int64)
  return {schema.USER_ID: user, schema.ITEM_IDS: items, schema.RATINGS: items % 5 + 2,
          schema.TIMESTAMPS: items * 60, schema.CATEGORY_IDS: cats,
          schema.CATEGORY_LENGTHS: lengths, schema.FAVORITE_CATEGORY: 3}


def test_slice_keeps_events_and_their_categories_aligned():
  r = record(9)
  part = windows.slice_events(r, 3, 7)
  np.testing.assert_array_equal(part[schema.ITEM_IDS], [103, 104, 105, 106])
  np.testing.assert_array_equal(part[schema.CATEGORY_LENGTHS], [0, 1, 2, 0])
  # Event i's categories are all 10 + i.
  np.testing.assert_array_equal(part[schema.CATEGORY_IDS], [14, 15, 15])
  assert part[schema.USER_ID] == b"u" and part[schema.FAVORITE_CATEGORY] == 3


def test_windows_cover_the_history_and_are_deterministic():
  src = [record(3, b"short"), record(40, b"long")]
  ds = windows.RandomWindows(src, window=9, seed=0, passes=50)
  # ceil((3 - 1) / 9) = 1 and ceil((40 - 1) / 9) = 5 windows per pass.
  assert ds.windows_per_pass == 6 and len(ds) == 300
  ends, starts = set(), set()
  for i in range(len(ds)):
    w = ds[i]
    items = np.asarray(w[schema.ITEM_IDS])
    if w[schema.USER_ID] == b"short":
      np.testing.assert_array_equal(items, [100, 101, 102])   # short records stay whole
      continue
    # 10 consecutive events (+ the one before, for the first input's time gap).
    assert items.size in (10, 11) and np.all(np.diff(items) == 1)
    ends.add(int(items[-1]))
    starts.add(int(items[-10]))
    ex = T.CropAndPad(9, 2).map(w)
    assert ex[T.MASK].sum() == 9 and ex[T.TARGETS_ITEM][8] == items[-1]
  # Every end position is drawn over 250 long windows: the whole history is trained on.
  assert ends == set(range(109, 140)) and min(starts) == 100
  again = windows.RandomWindows(src, window=9, seed=0, passes=50)
  np.testing.assert_array_equal(again[17][schema.ITEM_IDS], ds[17][schema.ITEM_IDS])
  other = windows.RandomWindows(src, window=9, seed=1, passes=50)
  assert any(not np.array_equal(other[i][schema.ITEM_IDS], ds[i][schema.ITEM_IDS])
             for i in range(len(ds)))


def test_bad_arguments():
  with pytest.raises(ValueError, match="window must be >= 1"):
    windows.RandomWindows([record(3)], window=0, seed=0)
  with pytest.raises(IndexError, match="out of range"):
    windows.RandomWindows([record(3)], window=4, seed=0, passes=1)[5]


def test_drop_event_removes_one_event_and_its_categories():
  record = {schema.USER_ID: b"u", schema.ITEM_IDS: np.array([5, 6, 7, 8]),
            schema.RATINGS: np.array([2, 3, 4, 5]), schema.TIMESTAMPS: np.array([1, 2, 3, 4]),
            schema.CATEGORY_LENGTHS: np.array([1, 2, 0, 1]),
            schema.CATEGORY_IDS: np.array([10, 11, 12, 13]), schema.FAVORITE_CATEGORY: 9}
  out = windows.drop_event(record, 1)
  np.testing.assert_array_equal(out[schema.ITEM_IDS], [5, 7, 8])
  np.testing.assert_array_equal(out[schema.RATINGS], [2, 4, 5])
  np.testing.assert_array_equal(out[schema.TIMESTAMPS], [1, 3, 4])
  np.testing.assert_array_equal(out[schema.CATEGORY_LENGTHS], [1, 0, 1])
  np.testing.assert_array_equal(out[schema.CATEGORY_IDS], [10, 13])
  assert out[schema.FAVORITE_CATEGORY] == 9 and out[schema.USER_ID] == b"u"
  np.testing.assert_array_equal(record[schema.ITEM_IDS], [5, 6, 7, 8])  # input untouched
  # An event without categories, and the last event.
  out = windows.drop_event(record, 2)
  np.testing.assert_array_equal(out[schema.CATEGORY_IDS], [10, 11, 12, 13])
  np.testing.assert_array_equal(windows.drop_event(record, 3)[schema.CATEGORY_IDS], [10, 11, 12])
  with pytest.raises(IndexError, match="event 4 of a record with 4 events"):
    windows.drop_event(record, 4)


def test_drop_before_target_keeps_the_target_and_needs_three_events():
  from user_llm_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  record = {schema.ITEM_IDS: np.array([5, 6, 7]), schema.RATINGS: np.array([2, 3, 4]),
            schema.TIMESTAMPS: np.array([1, 2, 3]), schema.CATEGORY_LENGTHS: np.array([1, 1, 1]),
            schema.CATEGORY_IDS: np.array([10, 11, 12])}
  out = ranking.DropBeforeTarget().map(record)
  np.testing.assert_array_equal(out[schema.ITEM_IDS], [5, 7])
  short = windows.drop_event(record, 0)
  with pytest.raises(ValueError, match="a record of 2 events"):
    ranking.DropBeforeTarget().map(short)
