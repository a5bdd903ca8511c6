"""Timeline building: ordering, de-duplication, metadata join, vocabularies, both protocols.

The fixture timeline (tests/data_fixtures.py RATINGS), hand-sorted:
  user 10: t100 m2, t200 m4, t300 m3 (row 1), t300 m1 (row 2, tie), t400 m5
  user 20: m1, m2, m3, m4
  user 30: m5, m1 (two events only)
"""

import numpy as np
import pytest

from data_pipelines import timelines
from data_pipelines.readers import make_reader
from data_pipelines.records import RawEvent
from tests import data_fixtures as fx
from user_llm_jax.data import schema

LLO = timelines.TimelineOptions(protocol="leave_last_out")


def _build(tmp_path, options=LLO, ratings=fx.RATINGS, movies=fx.MOVIES):
  fx.write_movielens_csv(tmp_path, ratings=ratings, movies=movies)
  return timelines.build_timelines(make_reader("movielens", tmp_path), options,
                                   show_progress=False)


def _raw_items(tl, split):
  """Each record of a split as its raw movie ids (via the event codes)."""
  return [[int(tl.vocabulary.items[i].raw_id) if i >= schema.FIRST_ID else None
           for i in rec[schema.ITEM_IDS]] for _, rec in tl.records(split)]


def test_leave_last_out_exact_splits_and_tie_order(tmp_path):
  tl = _build(tmp_path)
  assert tl.statistics["records_per_split"] == {"train": 2, "validation": 2, "test": 2}
  # Item 5 only occurs as user 10's test target: OOV (None) and counted.
  assert _raw_items(tl, "train") == [[2, 4, 3], [1, 2]]
  assert _raw_items(tl, "validation") == [[2, 4, 3, 1], [1, 2, 3]]
  assert _raw_items(tl, "test") == [[2, 4, 3, 1, None], [1, 2, 3, 4]]
  recs = [r for _, r in tl.records("test")]
  assert recs[0][schema.USER_ID] == "10"
  np.testing.assert_array_equal(recs[0][schema.TIMESTAMPS], [100, 200, 300, 300, 400])
  ratings = [tl.vocabulary.ratings[r] for r in recs[0][schema.RATINGS]]
  assert ratings == [4.0, 2.0, 3.5, 5.0, 4.5]
  drops = tl.statistics["drops"]["counts"]
  assert drops["user_fewer_than_3_events"] == 1
  assert drops["events_of_user_fewer_than_3_events"] == 2
  assert drops["oov_target_test_counted_not_dropped"] == 1
  assert "oov_target_validation_counted_not_dropped" not in drops
  assert tl.statistics["users_read"] == 3 and tl.statistics["users_kept"] == 2
  assert tl.statistics["events_read"] == 11 and tl.statistics["events_kept"] == 9


def test_vocabularies_from_train_only(tmp_path):
  tl = _build(tmp_path)
  vocab = tl.vocabulary
  # Train counts: m2 x2, then m3, m1, m4 once each in first-seen order of the file.
  assert [it.raw_id for it in vocab.items] == ["<pad:item>", "<oov:item>", "2", "3", "1", "4"]
  assert vocab.items[2].title == "American President, The (1995)"
  assert list(vocab.ratings[schema.FIRST_ID:]) == [x / 2 for x in range(1, 11)]
  # Category counts over train events: Comedy 3, Romance 3, Adventure 2, Drama 2, ...
  assert list(vocab.categories) == [
      "<pad:category>", "<oov:category>", "Comedy", "Romance", "Adventure", "Drama",
      "Action", "Animation", "Children", "Sci-Fi"]
  # Item 5 (Action|Crime|Thriller) is OOV but its categories still appear per event.
  _, rec = next(tl.records("test"))
  per_event = schema.split_categories(rec[schema.CATEGORY_IDS], rec[schema.CATEGORY_LENGTHS])
  names = [[vocab.categories[c] for c in cats] for cats in per_event]
  assert names[-1] == ["Action", "<oov:category>", "<oov:category>"]
  assert names[0] == ["Comedy", "Drama", "Romance"]


def test_favorite_category_ties_go_to_most_recent(tmp_path):
  tl = _build(tmp_path)
  cats = tl.vocabulary.categories
  favs = {split: [cats[r[schema.FAVORITE_CATEGORY]] for _, r in tl.records(split)]
          for split in ("train", "test")}
  # User 10 test history m2, m4, m3, m1: Comedy 2, Romance 2, Adventure 2 -> Adventure
  # is the most recent of the tied ones.
  assert favs["test"][0] == "Adventure"
  # User 10 train history m2, m4 (target m3): Comedy 2 = Romance 2; Romance is listed
  # after Comedy within m4, so it is the most recent.
  assert favs["train"][0] == "Romance"


def test_favorite_category_function():
  flat = np.array([5, 6, 5, 6, 7, 9], np.int32)
  assert timelines.favorite_category(flat, np.array([2, 2, 1, 1])) == 6
  assert timelines.favorite_category(flat, np.array([1, 1, 4])) == 6
  assert timelines.favorite_category(np.array([0, 1, 3], np.int32),
                                     np.array([2, 1])) == schema.PAD_ID
  assert timelines.favorite_category(np.zeros(0, np.int32), np.array([0])) == schema.PAD_ID


def test_paper_protocol_windows(tmp_path):
  tl = _build(tmp_path, timelines.TimelineOptions(protocol="paper", window=2))
  assert tl.statistics["records_per_split"] == {"train": 3, "test": 2}
  assert _raw_items(tl, "train") == [[2, 4, 3], [4, 3, 1], [1, 2, 3]]
  assert _raw_items(tl, "test") == [[3, 1, None], [2, 3, 4]]
  assert tl.statistics["drops"]["counts"]["user_fewer_than_4_events"] == 1


def test_paper_protocol_stride_is_aligned_to_the_last_window(tmp_path):
  tl = _build(tmp_path / "a", timelines.TimelineOptions(protocol="paper", window=2, stride=2))
  assert _raw_items(tl, "train") == [[2, 4, 3]]
  # User 20 has no train window; the vocabulary is user 10's train window (2, 4, 3).
  assert _raw_items(tl, "test") == [[3, None, None], [2, 3, 4]]
  assert tl.statistics["drops"]["counts"]["oov_target_test_counted_not_dropped"] == 1


# (window, stride, timeline length, positions some train record covers): a leading event
# before the first window (stride 2), and gaps between windows (stride > window + 1).
UNCOVERED_CASES = [(2, 2, 6, [1, 2, 3]), (1, 3, 8, [0, 1, 3, 4]), (1, 4, 11, [1, 2, 5, 6])]


@pytest.mark.parametrize("window, stride, n, covered", UNCOVERED_CASES)
def test_vocabulary_counts_only_events_a_train_record_covers(tmp_path, window, stride, n,
                                                              covered):
  fx.write_one_user_timeline(tmp_path, n)
  options = timelines.TimelineOptions(protocol="paper", window=window, stride=stride)
  tl = timelines.build_timelines(make_reader("movielens", tmp_path), options,
                                 show_progress=False)
  train = {k for rec in tl.splits["train"].tolist() for k in range(*rec)}
  assert sorted(train) == covered
  vocab = [it.raw_id for it in tl.vocabulary.items[schema.FIRST_ID:]]
  assert vocab == [str(100 + k) for k in covered]
  assert tl.vocabulary.categories[schema.FIRST_ID:] == ("Drama",)


def test_covered_mask():
  mask = timelines.covered_mask(10, np.array([[1, 3], [2, 4], [6, 7]]))
  assert np.flatnonzero(mask).tolist() == [1, 2, 3, 6]
  assert not timelines.covered_mask(3, np.zeros((0, 2), np.int64)).any()


def test_duplicates_counted_and_first_kept(tmp_path):
  ratings = fx.RATINGS + [(10, 2, 4.0, 100), (20, 3, 2.5, 30), (20, 3, 2.5, 30),
                          (20, 3, 3.0, 30)]  # last one differs in rating: kept
  tl = _build(tmp_path, ratings=ratings)
  assert tl.statistics["duplicate_events"] == 3
  assert tl.statistics["drops"]["counts"]["duplicate_event"] == 3
  assert _raw_items(tl, "test")[1] == [1, 2, 3, 3, 4]
  _, rec = list(tl.records("test"))[1]
  assert [tl.vocabulary.ratings[r] for r in rec[schema.RATINGS]] == [3.0, 1.0, 2.5, 3.0, 4.0]


def test_metadata_duplicates_and_missing(tmp_path):
  movies = fx.MOVIES + [(2, "Another Title (2000)", ("Horror",))]
  ratings = fx.RATINGS + [(20, 99, 4.0, 5)]
  tl = _build(tmp_path, ratings=ratings, movies=movies)
  drops = tl.statistics["drops"]
  assert drops["counts"]["duplicate_item_metadata"] == 1
  assert drops["counts"]["item_without_metadata"] == 1
  assert drops["examples"]["item_without_metadata"] == ["99"]
  by_raw = {it.raw_id: it for it in tl.vocabulary.items}
  assert by_raw["2"].title == "American President, The (1995)"  # first wins
  assert by_raw["99"].title == "99" and by_raw["99"].category_ids == ()


def test_min_item_count_maps_rare_items_to_oov(tmp_path):
  tl = _build(tmp_path, timelines.TimelineOptions(min_item_count=2))
  assert [it.raw_id for it in tl.vocabulary.items[2:]] == ["2"]
  assert tl.statistics["drops"]["counts"]["item_below_min_count_mapped_to_oov"] == 3
  assert _raw_items(tl, "train") == [[2, None, None], [None, 2]]


def test_empty_results_are_clear_errors(tmp_path):
  with pytest.raises(timelines.EmptyDatasetError, match=r"no user .* has the >= 52 events"):
    _build(tmp_path / "a", timelines.TimelineOptions(protocol="paper"))
  fx.write_movielens_csv(tmp_path / "b", ratings=[])
  with pytest.raises(timelines.EmptyDatasetError, match="no events read"):
    timelines.build_timelines(make_reader("movielens", tmp_path / "b"), LLO, show_progress=False)


def test_text_events_dedup_on_text_and_keep_it():
  events = [("u", "a", 5.0, 1, "great", "A"), ("u", "a", 5.0, 1, "great", "A"),
            ("u", "a", 5.0, 1, "other text", "A"), ("u", "b", 4.0, 2, "fine", "B"),
            ("u", "c", 3.0, 3, "meh", "C")]
  reader = fx.ListReader.make(events, [("a", "Item A", ("x",)), ("b", "Item B", ("y",))],
                              has_text=True)
  tl = timelines.build_timelines(reader, LLO, show_progress=False)
  assert tl.statistics["duplicate_events"] == 1
  _, rec = next(tl.records("test"))
  assert list(rec[schema.REVIEW_TEXTS]) == ["great", "other text", "fine", "meh"]
  assert list(rec[schema.REVIEW_SUMMARIES]) == ["A", "A", "B", "C"]
  assert tl.statistics["items_without_metadata"] == 1  # "c"


def test_rating_outside_vocabulary_is_oov_and_counted():
  events = [RawEvent("u", "a", 5.0, 1, 0), RawEvent("u", "b", 4.5, 2, 1),
            RawEvent("u", "c", 1.0, 3, 2)]
  reader = fx.ListReader.make(events, [])
  tl = timelines.build_timelines(reader, LLO, show_progress=False)
  _, rec = next(tl.records("test"))
  assert list(rec[schema.RATINGS]) == [6, schema.OOV_ID, 2]
  assert tl.statistics["drops"]["counts"]["rating_not_in_vocabulary_mapped_to_oov"] == 1


def test_options_validation():
  with pytest.raises(ValueError, match="protocol must be one of"):
    timelines.TimelineOptions(protocol="random")
  with pytest.raises(ValueError, match="window and stride"):
    timelines.TimelineOptions(protocol="paper", window=0)


def test_statistics_percentiles(tmp_path):
  tl = _build(tmp_path)
  pct = tl.statistics["events_per_user"]
  assert pct["max"] == 5 and pct["min"] == 2 and pct["p50"] == 4.0
