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


def test_the_cap_keeps_the_commonest_summaries():
  train = [record("a", ["Five Stars", "five  stars", "Great gift", "ok", "meh"]),
           record("b", ["Great Gift", "Meh", "FIVE STARS"])]
  # counts: five stars 3, great gift 2, meh 2, ok 1
  assert tc.frequent_summaries(train, 1, 2) == ("five stars", "great gift")
  assert tc.frequent_summaries(train, 1, 3) == ("five stars", "great gift", "meh")
  assert tc.frequent_summaries(train, 1, 0) == ("five stars", "great gift", "meh", "ok")
  assert tc.frequent_summaries(train, 2, 10) == ("five stars", "great gift", "meh")
  with pytest.raises(ValueError, match="max_text_categories must be >= 0"):
    tc.frequent_summaries(train, 1, -1)


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


def test_load_splits_adds_summary_categories_to_a_prepared_amazon_dataset(tmp_path):
  """Through the real prepared (ArrayRecord) sources: the vocabulary comes from the train
  records, every split's events carry their summary's id, iteration reaches the end."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top

  raw = tmp_path / "raw" / "Gift_Cards"
  raw.mkdir(parents=True)
  lines = []
  for u in range(6):
    for t in range(5):
      summary = "Five Stars" if u % 2 else f"user {u} words"
      lines.append(json.dumps({"reviewerID": f"U{u}", "asin": f"I{(u + t) % 4}",
                               "overall": 5.0, "unixReviewTime": 100 * t,
                               "reviewText": "ok", "summary": summary}))
  with gzip.open(raw / "Gift_Cards_5.json.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  data = common.movielens_data_section(protocol="leave_last_out", window=8, max_categories=3)
  data.update(dataset="amazon", manual_dir=str(raw), data_dir=str(tmp_path / "data"))
  plain = prepared.load_splits(data, str(tmp_path / "w"))
  data.text_categories = 3
  splits = prepared.load_splits(data, str(tmp_path / "w"))
  # Five Stars: 3 users x 3 train events; each other user's words: 3 train events.
  assert splits.vocab.categories[plain.vocab.num_categories:] == (
      "review: five stars", "review: user 0 words", "review: user 2 words",
      "review: user 4 words")
  records = list(splits.test)
  assert len(records) == len(plain.test) == 6
  for rec, old in zip(records, plain.test):
    cats = schema.split_categories(rec[schema.CATEGORY_IDS], rec[schema.CATEGORY_LENGTHS])
    olds = schema.split_categories(old[schema.CATEGORY_IDS], old[schema.CATEGORY_LENGTHS])
    names = [splits.vocab.categories[c[0]] for c in cats]
    summaries = {tc.normalise(s) for s in rec[schema.REVIEW_SUMMARIES]}
    assert len(summaries) == 1                     # one user, one habit
    assert names == ["review: " + summaries.pop()] * len(cats), names
    assert [c[1:] for c in cats] == olds           # the item's own categories follow
  assert len(list(splits.train)) == 6 and splits.validation is not None
  # data.max_text_categories keeps the commonest: Five Stars (9) and the first of the ties.
  data.max_text_categories = 2
  capped = prepared.load_splits(data, str(tmp_path / "w"))
  assert capped.vocab.categories[plain.vocab.num_categories:] == (
      "review: five stars", "review: user 0 words")
