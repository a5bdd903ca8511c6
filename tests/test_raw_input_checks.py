"""Raw-file hygiene shared by every reader: byte-order marks, cut last lines, negative times.

Each check runs on both parse paths a reader has (MovieLens: pyarrow blocks and the
line-by-line parser; JSON-lines dumps: pyarrow's JSON parser and the per-line parser).
"""

import gzip
import json
import pathlib

import pytest

from data_pipelines import amazon, google_local, movielens
from data_pipelines.readers import BadLineTracker, make_reader
from data_pipelines.records import BadInputError
from tests import data_fixtures as fx

BOM = b"\xef\xbb\xbf"
CUT = "last line has no trailing newline: the file may be truncated"


def _events(reader):
  return [(e.user, e.item, e.rating, e.timestamp) for e in reader.events()]


def _expected(ratings):
  return [(str(u), str(m), float(r), t) for u, m, r, t in ratings]


def _add_bom(path: pathlib.Path) -> None:
  path.write_bytes(BOM + path.read_bytes())


def _drop_final_newline(path: pathlib.Path, cut_chars: int = 0) -> None:
  data = path.read_bytes().rstrip(b"\r\n")
  path.write_bytes(data[:len(data) - cut_chars])


@pytest.fixture(params=["fast", "slow"])
def parse_path(request, monkeypatch):
  """'slow' makes pyarrow's first block fail, so the line-by-line parser reads the file."""
  if request.param == "slow":
    monkeypatch.setattr(movielens.MovieLensReader, "_block_is_clean", lambda self, b: False)
  return request.param


# ------------------------------------------------------------------------ byte-order mark


@pytest.mark.parametrize("crlf", [False, True])
def test_csv_with_utf8_bom_reads_like_without(tmp_path, parse_path, crlf):
  fx.write_movielens_csv(tmp_path, crlf=crlf)
  _add_bom(tmp_path / "ratings.csv")
  _add_bom(tmp_path / "movies.csv")
  reader = make_reader("movielens", tmp_path)
  assert _events(reader) == _expected(fx.RATINGS)
  items = {it.item: it for it in reader.items()}
  assert items["4"].title == "Amélie (2001)" and len(items) == len(fx.MOVIES)
  assert reader.tracker.bad_count == 0


def test_bom_in_tab_and_colon_layouts(tmp_path, parse_path):
  ratings = fx.integer_ratings()
  fx.write_movielens_100k(tmp_path / "100k", ratings=ratings)
  fx.write_movielens_dat(tmp_path / "dat", ratings=ratings)
  for path in ("100k/u.data", "100k/u.item", "100k/u.genre", "dat/ratings.dat",
               "dat/movies.dat"):
    _add_bom(tmp_path / path)
  for layout in ("100k", "dat"):
    reader = make_reader("movielens", tmp_path / layout)
    assert _events(reader) == _expected(ratings), layout
    assert {it.item for it in reader.items()} == {str(m[0]) for m in fx.MOVIES}


def test_bom_in_json_lines_dump(tmp_path):
  lines = [json.dumps({"reviewerID": "U", "asin": f"A{i}", "overall": 5.0,
                       "unixReviewTime": i}) for i in range(3)]
  with gzip.open(tmp_path / "Books_5.json.gz", "wb") as f:
    f.write(BOM + "\n".join(lines).encode() + b"\n")
  per_line = amazon.AmazonReader(tmp_path)
  assert [e.item for e in per_line.events()] == ["A0", "A1", "A2"]
  chunks = list(amazon.AmazonReader(tmp_path).event_chunks())
  assert [i for c in chunks for i in c.items.tolist()] == ["A0", "A1", "A2"]


# ------------------------------------------------------------------------ cut last line


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("cut_chars", [0, 6])  # A complete last row, and one cut mid-field.
def test_csv_last_line_without_newline_is_a_bad_line(tmp_path, parse_path, crlf, cut_chars):
  fx.write_movielens_csv(tmp_path, crlf=crlf)
  path = tmp_path / "ratings.csv"
  _drop_final_newline(path, cut_chars)
  last = len(fx.RATINGS) + 1  # The header is line 1.
  with pytest.raises(BadInputError, match=rf"{path}:{last}: {CUT}"):
    list(make_reader("movielens", tmp_path).event_chunks())
  tracker = BadLineTracker(max_bad_fraction=0.5)
  reader = make_reader("movielens", tmp_path, tracker=tracker)
  assert _events(reader) == _expected(fx.RATINGS[:-1])  # The cut row is not kept.
  assert tracker.bad_count == 1 and tracker.lines_read == len(fx.RATINGS)


def test_cut_last_line_after_many_clean_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(movielens, "_BLOCK_BYTES", 64)  # Many pyarrow blocks before it.
  ratings = [(u, m, 3.0, 1000 + u * 10 + m) for u in range(1, 40) for m in range(1, 4)]
  fx.write_movielens_csv(tmp_path, ratings=ratings)
  _drop_final_newline(tmp_path / "ratings.csv")
  tracker = BadLineTracker(max_bad_fraction=0.5)
  reader = make_reader("movielens", tmp_path, tracker=tracker)
  assert _events(reader) == _expected(ratings[:-1])
  assert [str(b) for b in tracker.examples] == [
      f"{tmp_path / 'ratings.csv'}:{len(ratings) + 1}: {tracker.examples[0].reason}"]
  assert tracker.examples[0].reason.startswith(CUT)
  assert tracker.lines_read == len(ratings)


def test_movies_files_without_final_newline(tmp_path):
  fx.write_movielens_csv(tmp_path / "csv")
  fx.write_movielens_dat(tmp_path / "dat", ratings=fx.integer_ratings())
  fx.write_movielens_100k(tmp_path / "100k", ratings=fx.integer_ratings())
  for movies in ("csv/movies.csv", "dat/movies.dat", "100k/u.item"):
    path = tmp_path / movies
    _drop_final_newline(path)
    reader = make_reader("movielens", path.parent)
    with pytest.raises(BadInputError, match=rf"{path}:\d+: {CUT}"):
      list(reader.items())
    tolerant = make_reader("movielens", path.parent, tracker=BadLineTracker(0.5))
    items = [it.item for it in tolerant.items()]
    assert items == [str(m[0]) for m in fx.MOVIES[:-1]], movies
  genre = tmp_path / "100k" / "u.genre"
  genre.write_bytes(genre.read_bytes().rstrip(b"\n"))
  with pytest.raises(BadInputError, match=rf"{genre}:19: {CUT}"):
    list(make_reader("movielens", tmp_path / "100k").items())


def test_dat_and_100k_ratings_without_final_newline(tmp_path, parse_path):
  ratings = fx.integer_ratings()
  for layout, write, name in (("dat", fx.write_movielens_dat, "ratings.dat"),
                              ("100k", fx.write_movielens_100k, "u.data")):
    write(tmp_path / layout, ratings=ratings)
    path = tmp_path / layout / name
    _drop_final_newline(path)
    with pytest.raises(BadInputError, match=rf"{path}:{len(ratings)}: {CUT}"):
      list(make_reader("movielens", tmp_path / layout).events())


@pytest.mark.parametrize("columnar", [False, True])
@pytest.mark.parametrize("last", [
    json.dumps({"reviewerID": "U", "asin": "Z", "overall": 5.0, "unixReviewTime": 9}),
    '{"reviewerID": "U", "asin": "Z", "ove',
])
def test_json_lines_last_line_without_newline(tmp_path, columnar, last):
  # The real dumps end with a newline, so a record without it marks a cut file even when
  # it parses.
  lines = [json.dumps({"reviewerID": "U", "asin": f"A{i}", "overall": 5.0,
                       "unixReviewTime": i}) for i in range(3)]
  path = tmp_path / "Books_5.json.gz"
  with gzip.open(path, "wb") as f:
    f.write(("\n".join(lines + [last])).encode())

  def read(reader):
    if columnar:
      return [i for c in reader.event_chunks() for i in c.items.tolist()]
    return [e.item for e in reader.events()]

  with pytest.raises(BadInputError, match=rf"{path}:4: {CUT}"):
    read(amazon.AmazonReader(tmp_path))
  tracker = BadLineTracker(0.5)
  assert read(amazon.AmazonReader(tmp_path, tracker=tracker)) == ["A0", "A1", "A2"]
  assert (tracker.bad_count, tracker.lines_read) == (1, 4)


def test_json_lines_trailing_blank_without_newline_is_fine(tmp_path):
  path = tmp_path / "Books_5.json.gz"
  with gzip.open(path, "wb") as f:
    f.write(json.dumps({"reviewerID": "U", "asin": "A", "overall": 5.0,
                        "unixReviewTime": 1}).encode() + b"\n  ")
  assert [e.item for e in amazon.AmazonReader(tmp_path).events()] == ["A"]


# ------------------------------------------------------------------------ negative time


def test_csv_negative_timestamp_is_a_bad_line(tmp_path, parse_path):
  fx.write_movielens_csv(tmp_path, extra_ratings_lines=["12,1,3.0,-5", "12,2,3.0,9"])
  line = len(fx.RATINGS) + 2
  with pytest.raises(BadInputError,
                     match=rf"ratings\.csv:{line}: timestamp must be >= 0, got -5"):
    list(make_reader("movielens", tmp_path).events())
  tracker = BadLineTracker(0.5)
  events = _events(make_reader("movielens", tmp_path, tracker=tracker))
  assert events == _expected(fx.RATINGS) + [("12", "2", 3.0, 9)]
  assert tracker.bad_count == 1


@pytest.mark.parametrize("columnar", [False, True])
def test_json_lines_negative_timestamp_is_a_bad_line(tmp_path, columnar):
  (tmp_path / "amazon").mkdir()
  (tmp_path / "google").mkdir()
  with gzip.open(tmp_path / "amazon" / "Books_5.json.gz", "wt") as f:
    for t in (5, -1, 6):
      f.write(json.dumps({"reviewerID": "U", "asin": "A", "overall": 5.0,
                          "unixReviewTime": t}) + "\n")
  with gzip.open(tmp_path / "google" / "review-Ohio.json.gz", "wt") as f:
    for t in (5000, -999, 6000):  # -999 ms is before the epoch too.
      f.write(json.dumps({"user_id": "1", "gmap_id": "0x1", "rating": 5, "time": t}) + "\n")
  for cls, sub, field in ((amazon.AmazonReader, "amazon", "unixReviewTime=-1"),
                          (google_local.GoogleLocalReader, "google", "time=-999")):
    reader = cls(tmp_path / sub)
    read = (lambda: list(reader.event_chunks())) if columnar else (
        lambda: list(reader.events()))
    with pytest.raises(BadInputError, match=rf":2: timestamp must be >= 0, got {field}"):
      read()
    tolerant = cls(tmp_path / sub, tracker=BadLineTracker(0.5))
    if columnar:
      times = [t for c in tolerant.event_chunks() for t in c.timestamps.tolist()]
    else:
      times = [e.timestamp for e in tolerant.events()]
    assert times == [5, 6]


def test_timeline_builder_rejects_a_negative_time_from_any_reader():
  from data_pipelines.timelines import TimelineOptions, build_timelines

  reader = fx.ListReader.make([("u", "a", 5.0, 1), ("u", "b", 5.0, -3), ("u", "c", 5.0, 2)],
                              [])
  with pytest.raises(BadInputError, match="event row 1 .* timestamp -3: timestamp must be"):
    build_timelines(reader, TimelineOptions(), show_progress=False)
