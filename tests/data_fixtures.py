"""Writers of small dataset fixtures in the real raw formats, importable by any test.

Every helper writes into a directory the caller owns (normally a pytest tmp dir)
and returns it. Ratings are given as (user, movie, rating, timestamp) tuples and
movies as (movie_id, title, genres) with genres a tuple of names.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
from collections.abc import Sequence

Rating = tuple[int, int, float, int]
Movie = tuple[int, str, tuple[str, ...]]

# A hand-checked toy catalogue: a title with a comma (quoted in csv), one with a
# colon (harmless in `::` files), one with a latin-1 character.
MOVIES: list[Movie] = [
    (1, "Toy Story (1995)", ("Adventure", "Animation", "Children")),
    (2, "American President, The (1995)", ("Comedy", "Drama", "Romance")),
    (3, "Star Wars: Episode IV - A New Hope (1977)", ("Action", "Adventure", "Sci-Fi")),
    (4, "Amélie (2001)", ("Comedy", "Romance")),
    (5, "Heat (1995)", ("Action", "Crime", "Thriller")),
]
# User 10: a tie at t=300 (rows 2 and 3 keep file order: movie 3 then movie 1).
# User 20: 4 events. User 30: 2 events (dropped by leave-last-out).
RATINGS: list[Rating] = [
    (10, 2, 4.0, 100), (10, 3, 3.5, 300), (10, 1, 5.0, 300), (10, 4, 2.0, 200),
    (10, 5, 4.5, 400), (20, 1, 3.0, 10), (20, 2, 1.0, 20), (20, 3, 2.5, 30),
    (20, 4, 4.0, 40), (30, 5, 5.0, 7), (30, 1, 0.5, 8),
]


def _fmt_rating(r: float) -> str:
  return f"{r:.1f}"


def write_movielens_csv(directory, ratings: Sequence[Rating] = RATINGS,
                        movies: Sequence[Movie] = MOVIES, crlf: bool = False,
                        extra_ratings_lines: Sequence[str] = ()) -> pathlib.Path:
  """ml-latest(-small) / ml-20m layout: ratings.csv + movies.csv (UTF-8)."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  nl = "\r\n" if crlf else "\n"
  lines = ["userId,movieId,rating,timestamp"]
  lines += [f"{u},{m},{_fmt_rating(r)},{t}" for u, m, r, t in ratings]
  lines += list(extra_ratings_lines)
  (d / "ratings.csv").write_bytes((nl.join(lines) + nl).encode("utf-8"))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator=nl)
  writer.writerow(["movieId", "title", "genres"])
  for m, title, genres in movies:
    writer.writerow([m, title, "|".join(genres) or "(no genres listed)"])
  (d / "movies.csv").write_bytes(buf.getvalue().encode("utf-8"))
  return d


def write_movielens_dat(directory, ratings: Sequence[Rating] = RATINGS,
                        movies: Sequence[Movie] = MOVIES, ml1m: bool = True,
                        extra_ratings_lines: Sequence[str] = ()) -> pathlib.Path:
  """ml-1m (with users.dat; integer ratings) or ml-10m layout, `::`, latin-1."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  fmt = (lambda r: str(int(r))) if ml1m else _fmt_rating
  lines = [f"{u}::{m}::{fmt(r)}::{t}" for u, m, r, t in ratings] + list(extra_ratings_lines)
  (d / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
  movie_lines = [f"{m}::{title}::{'|'.join(g)}" for m, title, g in movies]
  (d / "movies.dat").write_bytes(("\n".join(movie_lines) + "\n").encode("latin-1"))
  if ml1m:
    users = sorted({u for u, *_ in ratings})
    (d / "users.dat").write_text("".join(f"{u}::M::25::1::12345\n" for u in users))
  return d


ML100K_GENRE_NAMES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def write_movielens_100k(directory, ratings: Sequence[Rating] = RATINGS,
                         movies: Sequence[Movie] = MOVIES,
                         with_genre_file: bool = True) -> pathlib.Path:
  """ml-100k layout: u.data (tabs), u.item (pipes, latin-1, 19 flags), u.genre."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  lines = [f"{u}\t{m}\t{int(r)}\t{t}" for u, m, r, t in ratings]
  (d / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
  item_lines = []
  for m, title, genres in movies:
    genres = tuple("Children's" if g == "Children" else g for g in genres)
    flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRE_NAMES)
    item_lines.append(f"{m}|{title}|01-Jan-1995||http://example.org/{m}|{flags}")
  (d / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
  if with_genre_file:
    (d / "u.genre").write_text(
        "".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRE_NAMES)) + "\n",
        encoding="latin-1")
  return d


def integer_ratings(ratings: Sequence[Rating] = RATINGS) -> list[Rating]:
  """The fixture ratings rounded up to whole stars (for 5-star layouts)."""
  return [(u, m, float(max(1, int(r + 0.5))), t) for u, m, r, t in ratings]


def write_synthetic(directory, num_users: int = 60, num_items: int = 80,
                    events_per_user_mean: float = 30.0, seed: int = 0) -> pathlib.Path:
  """A small synthetic MovieLens-format dataset (the embedded default, tiny)."""
  from data_pipelines import synthetic

  synthetic.generate(directory, num_users=num_users, num_items=num_items,
                     events_per_user_mean=events_per_user_mean, seed=seed,
                     min_events_per_user=5, show_progress=False)
  return pathlib.Path(directory)


def prepare_synthetic(tmp_dir, protocol: str = "leave_last_out", window: int = 10,
                      **synthetic_kwargs):
  """Generates and prepares a tiny synthetic dataset; returns the PreparedDataset."""
  from data_pipelines import prepare

  raw = write_synthetic(os.path.join(tmp_dir, "raw"), **synthetic_kwargs)
  return prepare.prepare_dataset("synthetic", raw, os.path.join(tmp_dir, "prepared"),
                                 protocol=protocol, window=window, show_progress=False)


class ListReader:
  """Factory of in-memory readers (the reader interface over Python lists).

  `ListReader.make(events, items, ...)` returns a `data_pipelines.readers.Reader`
  instance, for tests of code that consumes readers (timelines, builder).
  """

  @staticmethod
  def make(events, items, rating_values=(1.0, 2.0, 3.0, 4.0, 5.0), has_text=False,
           name="listed", manual_dir=None, tracker=None):
    import tempfile

    from data_pipelines import readers
    from data_pipelines.records import RawEvent, RawItem

    class _Reader(readers.Reader):

      def events(self):
        for row, e in enumerate(events):
          yield e if isinstance(e, RawEvent) else RawEvent(*e[:4], row, *e[4:])

      def items(self):
        for it in items:
          yield it if isinstance(it, RawItem) else RawItem(*it)

    _Reader.name = name
    _Reader.rating_values = tuple(rating_values)
    _Reader.has_text = has_text
    return _Reader(manual_dir or tempfile.gettempdir(), tracker=tracker)


def write_one_user_timeline(directory, n: int, first_item: int = 100,
                            user: int = 1) -> pathlib.Path:
  """MovieLens csv with one user rating items first_item, first_item + 1, ... at t = 1..n.

  Every item occurs once, so an item is in the vocabulary exactly when a train record
  covers the event at its position (item - first_item).
  """
  ratings = [(user, first_item + k, 3.0, k + 1) for k in range(n)]
  movies = [(first_item + k, f"Movie {k} (2000)", ("Drama",)) for k in range(n)]
  return write_movielens_csv(directory, ratings=ratings, movies=movies)
