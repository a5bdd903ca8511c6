"""Google Local reader: millisecond timestamps, null text/categories, several states."""

import gzip
import json
import pathlib

import pytest

from data_pipelines import google_local
from data_pipelines.readers import BadLineTracker, make_reader
from data_pipelines.records import BadInputError, RawEvent, RawItem


def write_lines(path: pathlib.Path, records: list) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for rec in records:
      f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
  return path


def review(user, gmap, time_ms, rating=5, text="Nice place", **extra):
  return {"user_id": user, "name": "Some One", "time": time_ms, "rating": rating,
          "text": text, "pics": None, "resp": None, "gmap_id": gmap, **extra}


def meta(gmap, name, category, **extra):
  return {"name": name, "address": "1 Main St", "gmap_id": gmap, "description": None,
          "latitude": 21.3, "longitude": -157.8, "category": category, "avg_rating": 4.2,
          "num_of_reviews": 10, "price": None, "hours": None, "MISC": None,
          "state": "Open", "relative_results": None, "url": "https://maps", **extra}


@pytest.fixture
def dump(tmp_path) -> pathlib.Path:
  """Two states: Hawaii (10-core, with meta) and Vermont (full, with meta)."""
  write_lines(tmp_path / "review-Hawaii_10.json.gz", [
      review("101", "0xA", 1619471925044, text=None),
      review("102", "0xB", 1619471925999, rating=3, resp={"time": 1, "text": "Thanks"}),
      review("101", "0xB", 1500000000000, rating=4),
  ])
  write_lines(tmp_path / "meta-Hawaii.json.gz", [
      meta("0xA", "Porto&#39;s  Bakery ", ["Bakery", "Cafe", "Bakery"]),
      meta("0xB", "Bar", None),
      meta("0xA", "Porto's Bakery", ["Bakery"]),
  ])
  write_lines(tmp_path / "vt" / "review-Vermont.json.gz", [review("101", "0xC", 1000)])
  write_lines(tmp_path / "vt" / "meta-Vermont.json.gz", [meta("0xC", "Shop", ["Store"])])
  return tmp_path


def test_events_seconds_null_text_rows_across_states(dump):
  reader = google_local.GoogleLocalReader(dump)
  events = list(reader.events())
  assert events[0] == RawEvent("101", "0xA", 5.0, 1619471925, 0, "", "")
  assert events[1].timestamp == 1619471925 and events[1].rating == 3.0
  assert events[2].timestamp == 1500000000
  # Vermont follows Hawaii (sorted by state); rows keep running across files.
  assert events[3] == RawEvent("101", "0xC", 5.0, 1, 3, "Nice place", "")
  assert reader.counts["reviews_without_text"] == 1
  assert reader.tracker.lines_read == 4


def test_items_keep_all_categories_and_clean_names(dump):
  reader = google_local.GoogleLocalReader(dump)
  items = list(reader.items())
  assert items[0] == RawItem("0xA", "Porto's Bakery", ("Bakery", "Cafe"))
  assert items[1] == RawItem("0xB", "Bar", ())
  assert items[3] == RawItem("0xC", "Shop", ("Store",))
  assert len(items) == 4  # The repeated 0xA is yielded; the builder de-duplicates it.
  assert reader.counts["meta_records_without_category"] == 1


def test_state_selection_and_registry(dump):
  reader = make_reader("google_local", dump, states="Vermont")
  assert isinstance(reader, google_local.GoogleLocalReader)
  assert [e.item for e in reader.events()] == ["0xC"]
  assert reader.describe()["states"] == {"Vermont": {"ten_core": False,
                                                     "meta": "meta-Vermont.json.gz"}}
  with pytest.raises(FileNotFoundError, match=r"\['Ohio'\] not found.*Hawaii, Vermont"):
    google_local.GoogleLocalReader(dump, states=["Ohio"])


def test_ten_core_preferred_full_selectable(tmp_path):
  write_lines(tmp_path / "review-Ohio_10.json.gz", [review("1", "0x1", 5000)])
  write_lines(tmp_path / "review-Ohio.json.gz", [review("1", "0x1", 5000),
                                                 review("2", "0x1", 6000)])
  assert len(list(google_local.GoogleLocalReader(tmp_path).events())) == 1
  assert len(list(google_local.GoogleLocalReader(tmp_path, subset="full").events())) == 2


def test_missing_meta_still_reads_reviews(tmp_path):
  write_lines(tmp_path / "review-Ohio.json.gz", [review("1", "0x1", 5000)])
  reader = google_local.GoogleLocalReader(tmp_path)
  assert len(list(reader.events())) == 1 and list(reader.items()) == []
  assert reader.counts["states_without_meta_file"] == 1


@pytest.mark.parametrize("bad, reason", [
    ({"user_id": "1", "time": 5, "rating": 5}, "missing required field 'gmap_id'"),
    ({"user_id": "1", "gmap_id": "0x1", "time": None, "rating": 5},
     "missing required field 'time'"),
    ({"user_id": "1", "gmap_id": "0x1", "time": 5, "rating": 0}, "rating=0.0 is not one of"),
    ({"user_id": "1", "gmap_id": "0x1", "time": "soon", "rating": 5}, "expected numbers"),
    ('{"user_id": "1", "gmap_id"', "not a valid JSON record"),
])
def test_bad_line_names_file_line_and_field(tmp_path, bad, reason):
  path = write_lines(tmp_path / "review-Ohio.json.gz",
                     [review("1", "0x1", 5000), bad, review("2", "0x1", 7000)])
  with pytest.raises(BadInputError, match=rf"{path}:2: .*{reason}"):
    list(google_local.GoogleLocalReader(tmp_path).events())
  reader = google_local.GoogleLocalReader(tmp_path, tracker=BadLineTracker(0.5))
  assert [e.user for e in reader.events()] == ["1", "2"]
  assert reader.tracker.bad_count == 1


def test_truncated_gzip_names_the_file(tmp_path):
  path = write_lines(tmp_path / "review-Ohio.json.gz",
                     [review(str(i), f"0x{i}", i * 1000, text="x " * 80) for i in range(200)])
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(BadInputError, match=rf"{path}: truncated or corrupt gzip"):
    list(google_local.GoogleLocalReader(tmp_path).events())


def test_no_review_file_is_a_clear_error(tmp_path):
  write_lines(tmp_path / "meta-Ohio.json.gz", [meta("0x1", "A", None)])
  with pytest.raises(FileNotFoundError, match="no Google Local review file"):
    google_local.GoogleLocalReader(tmp_path)


def test_timeline_builder_multi_valued_categories_and_duplicates(tmp_path):
  """Every business category reaches the records; repeats are dropped once, by the builder."""
  from data_pipelines.timelines import TimelineOptions, build_timelines
  from user_llm_jax.data import schema

  write_lines(tmp_path / "review-Ohio.json.gz", [
      review("1", "0x1", 1000), review("1", "0x2", 2000, text=None),
      review("1", "0x1", 1000), review("1", "0x3", 3999)])
  write_lines(tmp_path / "meta-Ohio.json.gz", [
      meta("0x1", "Cafe One", ["Cafe", "Bakery"]), meta("0x2", "Two", None),
      meta("0x1", "Cafe One again", ["Bar"])])
  reader = google_local.GoogleLocalReader(tmp_path)
  t = build_timelines(reader, TimelineOptions("leave_last_out"), show_progress=False)
  s = t.statistics
  assert (s["events_read"], s["duplicate_events"]) == (4, 1)
  assert s["drops"]["counts"]["duplicate_item_metadata"] == 1
  assert s["items_without_metadata"] == 1  # 0x3
  ((key, test),) = list(t.records("test"))
  cats = {name: i for i, name in enumerate(t.vocabulary.categories)}
  assert set(cats) - {"<pad:category>", "<oov:category>"} == {"Cafe", "Bakery"}
  assert list(test[schema.TIMESTAMPS]) == [1, 2, 3]
  assert list(test[schema.CATEGORY_LENGTHS]) == [2, 0, 0]
  assert list(test[schema.CATEGORY_IDS]) == [cats["Cafe"], cats["Bakery"]]
  # Tie between Cafe and Bakery (once each): the most recent one, Bakery, wins.
  assert test[schema.FAVORITE_CATEGORY] == cats["Bakery"]
  assert list(test[schema.REVIEW_TEXTS]) == ["Nice place", "", "Nice place"]
  assert t.vocabulary.items[2].title == "Cafe One" and key.startswith("1/")


@pytest.mark.parametrize("chunk_size", [1, 4, 1 << 16])
def test_columnar_chunks_equal_per_line_events(tmp_path, chunk_size):
  write_lines(tmp_path / "review-Ohio.json.gz", [
      review("1", "0x1", 1_999), review("2", "0x2", -1, text=None), "",
      review("3", "0x3", "2000"),  # Time as a string: pyarrow rejects, per-line accepts.
      review("4", "0x4", 5000, rating=4.5), '{"user_id": "5"',
      review("6", "0x6", 7000, text="  spaced  "), review("7", None, 8000)])
  per_line = google_local.GoogleLocalReader(tmp_path, tracker=BadLineTracker(1.0))
  expected = [(e.user, e.item, e.rating, e.timestamp, e.review_text) for e in per_line.events()]
  columnar = google_local.GoogleLocalReader(tmp_path, tracker=BadLineTracker(1.0))
  got = []
  for chunk in columnar.event_chunks(chunk_size=chunk_size):
    got += zip(chunk.users.tolist(), chunk.items.tolist(), chunk.ratings.tolist(),
               chunk.timestamps.tolist(), chunk.review_texts.tolist())
  assert got == expected == [("1", "0x1", 5.0, 1, "Nice place"),
                             ("3", "0x3", 5.0, 2, "Nice place"),
                             ("6", "0x6", 5.0, 7, "spaced")]
  assert columnar.tracker.to_json() == per_line.tracker.to_json()
  assert [b.line for b in columnar.tracker.examples] == [2, 5, 6, 8]
  assert columnar.tracker.examples[0].reason == "timestamp must be >= 0, got time=-1"
