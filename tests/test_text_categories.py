"""Frequent review summaries as per-event categories (user_llm_jax/data/text_categories.py)."""

import numpy as np
import pytest

from user_llm_jax.data import schema
from user_llm_jax.data import source as source_lib
from user_llm_jax.data import text_categories as tc


def record(user, summaries, cats_per_event=((2,),)):
  n = len(summaries)
  cats = [list(cats_per_event[i % len(cats_per_event)]) for i in range(n)]
  return {schema.USER_ID: user.encode(), schema.ITEM_IDS: np.arange(2, 2 + n, dtype=np.int32),
          schema.RATINGS: np.full((n,), 6, np.int32),
          schema.TIMESTAMPS: np.arange(n, dtype=np.int64),
          schema.CATEGORY_IDS: np.asarray([c for e in cats for c in e], np.int32),
          schema.CATEGORY_LENGTHS: np.asarray([len(e) for e in cats], np.int32),
          schema.REVIEW_TEXTS: np.array([b""] * n, dtype=object),
          schema.REVIEW_SUMMARIES: np.array([s.encode() for s in summaries], dtype=object)}


def test_frequent_summaries_count_normalised_text_commonest_first():
  train = [record("a", ["Five Stars", "five  stars", "Great gift", ""]),
           record("b", ["Great Gift", "Meh", "FIVE STARS"])]
  assert tc.frequent_summaries(train, 2) == ("five stars", "great gift")
  # ties of count: alphabetical; min count 1 keeps every non-empty summary
  assert tc.frequent_summaries(train, 1) == ("five stars", "great gift", "meh")
  with pytest.raises(ValueError, match="text_categories must be >= 1"):
    tc.frequent_summaries(train, 0)


def test_each_known_summary_becomes_its_events_first_category():
  vocab = schema.Vocabulary("amazon", items=(), ratings=(), categories=(
      "<pad>", "<oov>", "Gift Cards", "Cards"))
  summary_map = tc.SummaryCategories(("five stars", "great gift"), vocab.num_categories)
  rec = record("a", ["Five Stars", "Unknown", "great gift"], cats_per_event=((2, 3), (2,)))
  out = summary_map(rec)
  assert schema.split_categories(out[schema.CATEGORY_IDS], out[schema.CATEGORY_LENGTHS]) == [
      [4, 2, 3], [2], [5, 2, 3]]
  assert rec[schema.CATEGORY_LENGTHS].tolist() == [2, 1, 2]   # the input is not modified
  extended = summary_map.extend(vocab)
  assert extended.categories[4:] == ("review: five stars", "review: great gift")
  assert extended.metadata["summary_categories"] == 2
  with pytest.raises(ValueError, match="start at 3"):
    tc.SummaryCategories(("x",), 3).extend(vocab)
  bad = dict(rec, **{schema.REVIEW_SUMMARIES: np.array([b"x"], dtype=object)})
  with pytest.raises(ValueError, match="1 review summaries for 3 events"):
    summary_map(bad)


def test_mapped_source_maps_every_read():
  src = source_lib.ListSource([record("a", ["Five Stars"]), record("b", ["Meh"])])
  mapped = tc.MappedSource(src, tc.SummaryCategories(("five stars",), 4))
  assert len(mapped) == 2
  assert mapped[0][schema.CATEGORY_IDS].tolist() == [4, 2]
  assert mapped[1][schema.CATEGORY_IDS].tolist() == [2]
  assert [r[schema.CATEGORY_IDS].tolist() for r in mapped[0:2]] == [[4, 2], [2]]


class EndsWithValueError(source_lib.ListSource):
  """Like an ArrayRecord source: ValueError, not IndexError, past the end."""

  def __getitem__(self, index):
    if isinstance(index, int) and not 0 <= index < len(self):
      raise ValueError("Record key should be in [0, num_records)")
    return super().__getitem__(index)


def test_mapped_source_iterates_and_bounds_like_a_sequence():
  src = EndsWithValueError([record("a", ["Five Stars"]), record("b", ["Meh"])])
  mapped = tc.MappedSource(src, tc.SummaryCategories(("five stars",), 4))
  assert [r[schema.USER_ID] for r in mapped] == [b"a", b"b"]
  assert mapped[-1][schema.USER_ID] == b"b"
  with pytest.raises(IndexError, match="record 2 of a source of 2"):
    mapped[2]  # pylint: disable=pointless-statement
