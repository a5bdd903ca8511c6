"""MovieLens readers for every public layout, auto-detected from the files present.

Layouts (GroupLens release -> files):
  * `csv`:  ml-latest(-small), ml-20m, ml-25m, ml-32m -> `ratings.csv`
    (userId,movieId,rating,timestamp) + `movies.csv` (movieId,title,genres);
    UTF-8 (a leading byte-order mark, as Excel writes, is skipped), LF or CRLF line
    ends, titles quoted when they contain commas.
    Ten half-star rating tokens.
  * `dat`:  ml-1m, ml-10m -> `ratings.dat` / `movies.dat` with `::` separators,
    latin-1. ml-1m (recognised by its `users.dat`) has 5 integer rating tokens,
    ml-10m ten half stars.
  * `100k`: ml-100k -> `u.data` (tab-separated user, item, rating, time) +
    `u.item` (pipe-separated, latin-1 titles, 19 genre flags named by `u.genre`
    or the fixed ml-100k list). 5 rating tokens.

Ratings are read with pyarrow's streaming CSV reader (typed columns, vectorised)
so ML-20M-sized files take seconds. Any anomaly in a block (a row with the wrong
number of fields, a non-numeric value, a rating outside the layout's scale, an
empty line) switches to a line-by-line parser from the first row of that block,
which reports the exact file and line of every malformed row to the tracker.

A negative timestamp is a malformed row. So is a last line without its line break
(in any of the files): a download cut mid-line can still parse (`610,170875,3.0,149`
for `...,1493846415`), so the missing newline is the only sign of the truncation.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from data_pipelines.readers import (UNTERMINATED_LAST_LINE, EventChunk, Reader,
                                    ends_with_newline, is_unterminated, open_text,
                                    require_file)
from data_pipelines.records import BadInputError, RawEvent, RawItem

HALF_STARS = tuple(x / 2 for x in range(1, 11))  # 0.5 ... 5.0
FIVE_STARS = (1.0, 2.0, 3.0, 4.0, 5.0)
# ml-100k's genre flags, in column order (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"
_CSV_COLUMNS = ("userId", "movieId", "rating", "timestamp")
_BLOCK_BYTES = 16 << 20


def detect_layout(manual_dir: str) -> tuple[str, str]:
  """Returns (layout, directory) for the MovieLens files in `manual_dir`.

  A single nested release directory (e.g. `manual_dir/ml-latest-small/`, as a
  zip extracts) is accepted too.

  Raises:
    FileNotFoundError: no layout found, or a layout with its companion file missing.
  """
  pairs = {"csv": ("ratings.csv", "movies.csv"), "dat": ("ratings.dat", "movies.dat"),
           "100k": ("u.data", "u.item")}
  candidates = [manual_dir] + sorted(
      os.path.join(manual_dir, d) for d in os.listdir(manual_dir)
      if os.path.isdir(os.path.join(manual_dir, d)))
  for directory in candidates:
    for layout, (ratings, movies) in pairs.items():
      has_r = os.path.exists(os.path.join(directory, ratings))
      has_m = os.path.exists(os.path.join(directory, movies))
      if has_r and not has_m:
        raise FileNotFoundError(
            f"{os.path.join(directory, ratings)} found but the required "
            f"{movies!r} is missing from {directory!r}")
      if has_r:
        return layout, directory
  raise FileNotFoundError(
      f"no MovieLens files in {manual_dir!r}: expected ratings.csv + movies.csv "
      "(ml-latest, ml-20m/25m/32m), ratings.dat + movies.dat (ml-1m, ml-10m) or "
      "u.data + u.item (ml-100k)")


class MovieLensReader(Reader):
  """Reads any MovieLens release; see the module docstring for the layouts."""

  name = "movielens"
  has_text = False

  def __init__(self, manual_dir, *, tracker=None, chunk_rows: int = 1_000_000, **options):
    super().__init__(manual_dir, tracker=tracker, **options)
    self.layout, self.directory = detect_layout(self.manual_dir)
    self.chunk_rows = chunk_rows
    if self.layout == "csv":
      self.ratings_path = os.path.join(self.directory, "ratings.csv")
      self.movies_path = os.path.join(self.directory, "movies.csv")
      self.rating_values = HALF_STARS
    elif self.layout == "dat":
      self.ratings_path = os.path.join(self.directory, "ratings.dat")
      self.movies_path = os.path.join(self.directory, "movies.dat")
      is_1m = os.path.exists(os.path.join(self.directory, "users.dat"))
      self.rating_values = FIVE_STARS if is_1m else HALF_STARS
    else:
      self.ratings_path = os.path.join(self.directory, "u.data")
      self.movies_path = os.path.join(self.directory, "u.item")
      self.rating_values = FIVE_STARS
    self._valid_ratings = np.asarray(self.rating_values, dtype=np.float64)

  def source_files(self) -> list[str]:
    return [self.ratings_path, self.movies_path]

  def describe(self) -> dict:
    return {**super().describe(), "layout": self.layout}

  # -- ratings ---------------------------------------------------------------

  def _arrow_options(self):
    """(read, parse, convert options, header lines, field names) of the layout."""
    if self.layout == "csv":
      with open_text(self.ratings_path, "utf-8") as f:
        header = f.readline().rstrip("\r\n").split(",")
      missing = [c for c in _CSV_COLUMNS if c not in header]
      if missing:
        raise BadInputError(
            f"{self.ratings_path}:1: header {header} lacks required column(s) {missing}; "
            f"expected {','.join(_CSV_COLUMNS)}")
      names, delimiter, header_lines = header, ",", 1
    elif self.layout == "dat":  # "u::m::r::t" -> 7 fields split on ':'.
      names, delimiter, header_lines = ["userId", "_1", "movieId", "_2", "rating", "_3",
                                        "timestamp"], ":", 0
    else:
      names, delimiter, header_lines = list(_CSV_COLUMNS), "\t", 0
    types = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
             "timestamp": pa.int64()}
    types.update({n: pa.string() for n in names if n.startswith("_")})
    read = pa_csv.ReadOptions(column_names=names, skip_rows=header_lines,
                              block_size=_BLOCK_BYTES, use_threads=False)
    parse = pa_csv.ParseOptions(delimiter=delimiter, quote_char=False,
                                ignore_empty_lines=False,
                                invalid_row_handler=self._on_invalid_row)
    convert = pa_csv.ConvertOptions(column_types=types,
                                    include_columns=list(_CSV_COLUMNS) + [
                                        n for n in names if n.startswith("_")])
    return read, parse, convert, header_lines, names

  def _on_invalid_row(self, row) -> str:
    self._invalid_seen = True
    return "skip"

  def _block_is_clean(self, batch: pa.RecordBatch) -> bool:
    for name in batch.schema.names:
      col = batch.column(name)
      if col.null_count:
        return False
      if name.startswith("_") and not pc.all(pc.equal(col, "")).as_py():
        return False
    if pc.any(pc.less(batch.column("timestamp"), 0)).as_py():
      return False
    ratings = batch.column("rating").to_numpy()
    return bool(np.isin(ratings, self._valid_ratings).all())

  def event_chunks(self, chunk_size: int | None = None) -> Iterator[EventChunk]:
    """Yields the ratings as columnar chunks in file order (ids stay int64).

    Each clean block is yielded once the next one has been read: when the file lacks
    its final newline, its last block goes to the line-by-line parser, which reports
    the unterminated line.
    """
    read, parse, convert, header_lines, names = self._arrow_options()
    cut = not ends_with_newline(self.ratings_path)
    self._invalid_seen = False
    rows_done, pending, clean_to_end = 0, None, False

    def emit(batch: pa.RecordBatch) -> EventChunk:
      nonlocal rows_done
      self.tracker.count_lines(batch.num_rows)
      rows_done += batch.num_rows
      return EventChunk(
          users=batch.column("userId").to_numpy(),
          items=batch.column("movieId").to_numpy(),
          ratings=batch.column("rating").to_numpy(),
          timestamps=batch.column("timestamp").to_numpy())

    try:
      reader = pa_csv.open_csv(self.ratings_path, read_options=read, parse_options=parse,
                               convert_options=convert)
      for batch in reader:
        if self._invalid_seen or not self._block_is_clean(batch):
          break
        if pending is not None:
          yield emit(pending)
        pending = batch
      else:
        clean_to_end = True
    except pa.ArrowInvalid:
      pass  # a value that does not convert: locate it line by line below.
    if pending is not None and not (clean_to_end and cut):
      yield emit(pending)
    if clean_to_end and not cut:
      return
    yield from self._slow_chunks(first_line=header_lines + rows_done + 1, names=names)

  def _parse_rating_line(self, text: str, names: list[str]):
    """Returns (user, item, rating, timestamp) or a reason string."""
    if self.layout == "dat":
      fields = text.split("::")
      expected = 4
      cols = dict(zip(_CSV_COLUMNS, fields))
    else:
      fields = text.split("," if self.layout == "csv" else "\t")
      expected = len(names)
      cols = dict(zip(names, fields))
    if len(fields) != expected:
      return f"expected {expected} fields, found {len(fields)}: {text[:80]!r}"
    try:
      user, item = int(cols["userId"]), int(cols["movieId"])
    except ValueError:
      return f"user/movie id is not an integer: {text[:80]!r}"
    try:
      rating = float(cols["rating"])
    except ValueError:
      return f"rating {cols['rating']!r} is not a number"
    if rating not in self.rating_values:
      return f"rating {rating} is not one of {list(self.rating_values)}"
    try:
      ts = int(cols["timestamp"])
    except ValueError:
      return f"timestamp {cols['timestamp']!r} is not an integer"
    if ts < 0:
      return f"timestamp must be >= 0, got {ts}"
    return user, item, rating, ts

  def _slow_chunks(self, first_line: int, names: list[str]) -> Iterator[EventChunk]:
    """Line-by-line parse from 1-based `first_line`, reporting bad lines exactly."""
    encoding = "utf-8" if self.layout == "csv" else "latin-1"
    buf: list[tuple] = []
    with open_text(self.ratings_path, encoding) as f:
      for line_no, raw in enumerate(itertools.islice(f, first_line - 1, None), first_line):
        text = raw.rstrip("\r\n")
        self.tracker.count_lines()
        parsed = (UNTERMINATED_LAST_LINE if is_unterminated(raw)
                  else self._parse_rating_line(text, names))
        if isinstance(parsed, str):
          self.tracker.bad(self.ratings_path, line_no, parsed)
          continue
        buf.append(parsed)
        if len(buf) >= self.chunk_rows:
          yield _chunk_from_rows(buf)
          buf = []
    if buf:
      yield _chunk_from_rows(buf)

  def events(self) -> Iterator[RawEvent]:
    row = 0
    for chunk in self.event_chunks():
      for u, i, r, t in zip(chunk.users.tolist(), chunk.items.tolist(),
                            chunk.ratings.tolist(), chunk.timestamps.tolist()):
        yield RawEvent(str(u), str(i), r, t, row)
        row += 1

  # -- movies ----------------------------------------------------------------

  def items(self) -> Iterator[RawItem]:
    if self.layout == "csv":
      yield from self._items_csv()
    elif self.layout == "dat":
      yield from self._items_dat()
    else:
      yield from self._items_100k()

  def _items_csv(self) -> Iterator[RawItem]:
    path = self.movies_path
    with open_text(path, "utf-8") as f:
      lines = _LastLineWatch(f)
      reader = csv.reader(lines)
      header = next(reader, None)
      if header is None or [h.strip() for h in header[:3]] != ["movieId", "title", "genres"]:
        raise BadInputError(
            f"{path}:1: header {header} is not the expected movieId,title,genres")
      for fields in reader:
        self.tracker.count_lines()
        if not fields:
          continue  # blank line
        if lines.unterminated:
          self.tracker.bad(path, reader.line_num, UNTERMINATED_LAST_LINE)
          continue
        if len(fields) != 3:
          self.tracker.bad(path, reader.line_num,
                           f"expected 3 fields (movieId,title,genres), found {len(fields)}")
          continue
        yield from self._make_item(path, reader.line_num, *fields)

  def _movie_lines(self, separator: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-blank line of a latin-1 movies file.

    Every line, blank or not, counts in the tracker.
    """
    with open_text(self.movies_path, "latin-1") as f:
      for line_no, raw in enumerate(f, 1):
        self.tracker.count_lines()
        text = raw.rstrip("\r\n")
        if text and is_unterminated(raw):
          self.tracker.bad(self.movies_path, line_no, UNTERMINATED_LAST_LINE)
        elif text:
          yield line_no, text.split(separator)

  def _items_dat(self) -> Iterator[RawItem]:
    path = self.movies_path
    for line_no, fields in self._movie_lines("::"):
      if len(fields) != 3:
        self.tracker.bad(path, line_no,
                         f"expected 3 '::'-separated fields, found {len(fields)}")
        continue
      yield from self._make_item(path, line_no, *fields)

  def _ml100k_genres(self) -> tuple[str, ...]:
    path = os.path.join(self.directory, "u.genre")
    if not os.path.exists(path):
      return ML100K_GENRES
    names = {}
    with open_text(path, "latin-1") as f:
      for line_no, raw in enumerate(f, 1):
        text = raw.strip()
        if not text:
          continue
        if is_unterminated(raw):
          raise BadInputError(f"{path}:{line_no}: {UNTERMINATED_LAST_LINE}")
        name, _, idx = text.rpartition("|")
        if not name or not idx.isdigit():
          raise BadInputError(f"{path}:{line_no}: expected 'name|index', found {text!r}")
        names[int(idx)] = name
    if sorted(names) != list(range(len(names))):
      raise BadInputError(f"{path}: genre indices {sorted(names)} are not 0..{len(names) - 1}")
    return tuple(names[i] for i in range(len(names)))

  def _items_100k(self) -> Iterator[RawItem]:
    path = self.movies_path
    genres = self._ml100k_genres()
    expected = 5 + len(genres)
    for line_no, fields in self._movie_lines("|"):
      if len(fields) != expected or any(x not in ("0", "1") for x in fields[5:]):
        self.tracker.bad(path, line_no,
                         f"expected {expected} '|'-separated fields ending in "
                         f"{len(genres)} 0/1 genre flags, found {len(fields)} fields")
        continue
      names = "|".join(g for g, flag in zip(genres, fields[5:]) if flag == "1")
      yield from self._make_item(path, line_no, fields[0], fields[1], names)

  def _make_item(self, path: str, line_no: int, movie_id: str, title: str,
                 genres: str) -> Iterator[RawItem]:
    movie_id = movie_id.strip()
    if not movie_id.isdigit():
      self.tracker.bad(path, line_no, f"movieId {movie_id!r} is not an integer")
      return
    cats = tuple(g for g in genres.split("|") if g and g != NO_GENRES)
    yield RawItem(item=str(int(movie_id)), title=title.strip(), categories=cats)


class _LastLineWatch:
  """Iterates a text file's lines for `csv.reader`, noting a last line without line break.

  `csv.reader` pulls lines only as far as the record it returns, so `unterminated` is
  True exactly when the record just returned ends on such a line.
  """

  def __init__(self, lines: Iterator[str]):
    self._lines = iter(lines)
    self.unterminated = False

  def __iter__(self) -> "_LastLineWatch":
    return self

  def __next__(self) -> str:
    line = next(self._lines)
    self.unterminated = is_unterminated(line)
    return line


def _chunk_from_rows(rows: list[tuple]) -> EventChunk:
  users, items, ratings, ts = zip(*rows)
  return EventChunk(users=np.asarray(users, np.int64), items=np.asarray(items, np.int64),
                    ratings=np.asarray(ratings, np.float64),
                    timestamps=np.asarray(ts, np.int64))


class SyntheticReader(MovieLensReader):
  """The embedded synthetic dataset (`data_pipelines.synthetic`), MovieLens csv format."""

  name = "synthetic"
