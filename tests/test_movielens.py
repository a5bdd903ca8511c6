"""MovieLens readers: every layout on fixtures in the real formats, and bad input."""

import numpy as np
import pytest

from data_pipelines import movielens
from data_pipelines.readers import BadLineTracker, make_reader
from data_pipelines.records import BadInputError
from tests import data_fixtures as fx


def _events(reader):
  return [(e.user, e.item, e.rating, e.timestamp, e.row) for e in reader.events()]


def _expected(ratings):
  return [(str(u), str(m), float(r), t, i) for i, (u, m, r, t) in enumerate(ratings)]


@pytest.mark.parametrize("crlf", [False, True])
def test_csv_layout(tmp_path, crlf):
  fx.write_movielens_csv(tmp_path, crlf=crlf)
  reader = make_reader("movielens", tmp_path)
  assert reader.layout == "csv"
  assert reader.rating_values == movielens.HALF_STARS and len(reader.rating_values) == 10
  assert _events(reader) == _expected(fx.RATINGS)
  items = {it.item: it for it in reader.items()}
  assert items["2"].title == "American President, The (1995)"  # quoted comma
  assert items["2"].categories == ("Comedy", "Drama", "Romance")
  assert items["4"].title == "Amélie (2001)"
  assert reader.tracker.bad_count == 0
  # Data rows of both files (headers are not counted).
  assert reader.tracker.lines_read == len(fx.RATINGS) + len(fx.MOVIES)


def test_csv_no_genres_listed_and_nested_release_dir(tmp_path):
  movies = fx.MOVIES[:4] + [(5, "Heat (1995)", ())]
  fx.write_movielens_csv(tmp_path / "ml-latest-small", movies=movies)
  reader = make_reader("movielens", tmp_path)  # zip-style nesting is found
  items = {it.item: it for it in reader.items()}
  assert items["5"].categories == ()


def test_dat_ml1m_layout(tmp_path):
  ratings = fx.integer_ratings()
  fx.write_movielens_dat(tmp_path, ratings=ratings, ml1m=True)
  reader = make_reader("movielens", tmp_path)
  assert reader.layout == "dat" and reader.rating_values == movielens.FIVE_STARS
  assert _events(reader) == _expected(ratings)
  items = {it.item: it for it in reader.items()}
  assert items["3"].title == "Star Wars: Episode IV - A New Hope (1977)"  # ':' inside '::'
  assert items["4"].title == "Amélie (2001)"  # latin-1 decoded
  assert items["3"].categories == ("Action", "Adventure", "Sci-Fi")


def test_dat_ml10m_layout_has_half_stars(tmp_path):
  fx.write_movielens_dat(tmp_path, ml1m=False)
  reader = make_reader("movielens", tmp_path)
  assert reader.rating_values == movielens.HALF_STARS
  assert _events(reader) == _expected(fx.RATINGS)


@pytest.mark.parametrize("with_genre_file", [True, False])
def test_ml100k_layout(tmp_path, with_genre_file):
  ratings = fx.integer_ratings()
  fx.write_movielens_100k(tmp_path, ratings=ratings, with_genre_file=with_genre_file)
  reader = make_reader("movielens", tmp_path)
  assert reader.layout == "100k" and reader.rating_values == movielens.FIVE_STARS
  assert _events(reader) == _expected(ratings)
  items = {it.item: it for it in reader.items()}
  assert items["4"].title == "Amélie (2001)"
  assert items["1"].categories == ("Adventure", "Animation", "Children's")
  assert items["5"].categories == ("Action", "Crime", "Thriller")


def test_event_chunks_are_columnar_int64(tmp_path):
  fx.write_movielens_csv(tmp_path)
  chunks = list(make_reader("movielens", tmp_path).event_chunks())
  assert len(chunks) == 1 and chunks[0].users.dtype == np.int64
  np.testing.assert_array_equal(chunks[0].timestamps, [r[3] for r in fx.RATINGS])


@pytest.mark.parametrize("bad_line, reason", [
    ("11,2,abc,5", "rating 'abc' is not a number"),
    ("11,2,4.0", "expected 4 fields, found 3"),
    ("11,2,4.0,5,9", "expected 4 fields, found 5"),
    ("11,2,7.0,5", "rating 7.0 is not one of"),
    ("11,x,4.0,5", "not an integer"),
    ("", "expected 4 fields, found 1"),
])
def test_csv_malformed_row_names_file_and_line(tmp_path, bad_line, reason):
  ratings = fx.RATINGS[:3]
  fx.write_movielens_csv(tmp_path, ratings=ratings,
                         extra_ratings_lines=[bad_line, "12,1,3.0,9"])
  reader = make_reader("movielens", tmp_path)
  with pytest.raises(BadInputError) as err:
    list(reader.event_chunks())
  # header + 3 rows -> the bad row is line 5.
  assert f"{tmp_path / 'ratings.csv'}:5:" in str(err.value)
  assert reason in str(err.value)


def test_malformed_row_in_a_later_block_is_located_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(movielens, "_BLOCK_BYTES", 64)  # many tiny pyarrow blocks
  ratings = [(u, m, 3.0, 1000 + u * 10 + m) for u in range(1, 40) for m in range(1, 4)]
  fx.write_movielens_csv(tmp_path, ratings=ratings, extra_ratings_lines=["5,5,x,5"],
                         crlf=True)
  tracker = BadLineTracker(max_bad_fraction=0.5)
  reader = make_reader("movielens", tmp_path, tracker=tracker)
  events = list(reader.events())
  assert [(int(e.user), int(e.item), e.rating, e.timestamp) for e in events] == ratings
  assert tracker.bad_count == 1
  assert str(tracker.examples[0]) == (
      f"{tmp_path / 'ratings.csv'}:{len(ratings) + 2}: rating 'x' is not a number")
  assert tracker.lines_read == len(ratings) + 1


def test_max_bad_fraction_tolerates_and_then_fails(tmp_path):
  fx.write_movielens_csv(tmp_path, extra_ratings_lines=["1,2", "12,1,3.0,9"])
  tracker = BadLineTracker(max_bad_fraction=0.1)
  reader = make_reader("movielens", tmp_path, tracker=tracker)
  events = list(reader.events())
  assert len(events) == len(fx.RATINGS) + 1  # the good row after the bad one is kept
  assert tracker.bad_count == 1 and tracker.lines_read == len(fx.RATINGS) + 2
  tracker.check()  # 1 / 13 < 0.1
  strict = BadLineTracker(max_bad_fraction=0.05)
  list(make_reader("movielens", tmp_path, tracker=strict).events())
  with pytest.raises(BadInputError, match="1 of 13 lines are malformed"):
    strict.check()


def test_dat_malformed_row(tmp_path):
  fx.write_movielens_dat(tmp_path, ratings=fx.integer_ratings(),
                         extra_ratings_lines=["1::2::3"])
  with pytest.raises(BadInputError, match=r"ratings\.dat:12: expected 4 fields, found 3"):
    list(make_reader("movielens", tmp_path).events())


def test_ml1m_rejects_half_star(tmp_path):
  fx.write_movielens_dat(tmp_path, ratings=fx.integer_ratings(),
                         extra_ratings_lines=["1::2::3.5::9"])
  with pytest.raises(BadInputError, match=r"ratings\.dat:12: rating 3.5 is not one of"):
    list(make_reader("movielens", tmp_path).events())


def test_malformed_movies_csv_row(tmp_path):
  fx.write_movielens_csv(tmp_path)
  with open(tmp_path / "movies.csv", "a", encoding="utf-8") as f:
    f.write("77,Only Two Fields\n")
  reader = make_reader("movielens", tmp_path)
  with pytest.raises(BadInputError, match=r"movies\.csv:7: expected 3 fields"):
    list(reader.items())


def test_ml100k_wrong_flag_count(tmp_path):
  fx.write_movielens_100k(tmp_path, ratings=fx.integer_ratings())
  with open(tmp_path / "u.item", "a", encoding="latin-1") as f:
    f.write("9|Short|01-Jan-1995||url|0|1\n")
  with pytest.raises(BadInputError, match=r"u\.item:6: expected 24"):
    list(make_reader("movielens", tmp_path).items())


def test_missing_files_and_columns(tmp_path):
  with pytest.raises(FileNotFoundError, match="no MovieLens files"):
    make_reader("movielens", tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_reader("movielens", tmp_path / "nope")
  fx.write_movielens_csv(tmp_path)
  (tmp_path / "movies.csv").unlink()
  with pytest.raises(FileNotFoundError, match="required 'movies.csv' is missing"):
    make_reader("movielens", tmp_path)
  fx.write_movielens_csv(tmp_path)
  (tmp_path / "ratings.csv").write_text("userId,movieId,timestamp\n1,2,3\n")
  with pytest.raises(BadInputError, match=r"ratings\.csv:1: .*lacks required column.*rating"):
    list(make_reader("movielens", tmp_path).events())


def test_unknown_dataset_and_reader_option(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    make_reader("nope", tmp_path)
  fx.write_movielens_csv(tmp_path)
  with pytest.raises(TypeError, match="unknown reader options"):
    make_reader("movielens", tmp_path, color="red")


def test_real_ml_latest_small(shared_data):
  reader = make_reader("movielens", shared_data / "ml-latest-small")
  users, n = set(), 0
  for chunk in reader.event_chunks():
    users.update(chunk.users.tolist())
    n += len(chunk)
  assert (len(users), n) == (610, 100_836)
  items = list(reader.items())
  assert len(items) == 9742
  assert reader.tracker.bad_count == 0
