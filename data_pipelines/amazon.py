"""Reader for the Amazon Review dumps (McAuley lab): the 2018 and the 2014 release.

Files recognised in `manual_dir` (and its sub-directories, one category per folder is fine):

  2018 release  `<Category>_5.json.gz` (5-core) or `<Category>.json.gz` (full), JSON lines
                with reviewerID, asin, overall, unixReviewTime, reviewText, summary;
                `meta_<Category>.json.gz`, JSON lines with asin, title, category (a list,
                most general first). The whole dump: All_Amazon_Review[_5] / All_Amazon_Meta.
  2014 release  `reviews_<Category>_5.json.gz` / `reviews_<Category>.json.gz`, same review
                fields; `meta_<Category>.json.gz` whose lines are Python-literal dicts
                (single quotes, `None`) with asin, title, categories (a list of paths).

The line format (strict JSON or Python literal) is detected per file from its first line, so
either release's review or metadata file may come in either format; Python literals are parsed
with `ast.literal_eval` (never `eval`). Everything is streamed: `event_chunks()` parses
JSON-lines review files in blocks with pyarrow (columnar, vectorised checks) and falls back to
the per-line parser for any block it cannot take whole, so the result, line counts and bad-line
reports are exactly those of the per-line `events()` (used by the Beam path). The streaming
helpers here are shared with `data_pipelines.google_local`.

Choices (see ../shared/PAPER.md, "Data protocol"):
  * Category of an item = the deepest leaf of its metadata category path (2014: of the first
    path). The 2018 metadata often has product-feature sentences and HTML fragments appended
    to the path (e.g. `["Gift Cards", "Gift Cards", "No expiration, no fees.", ...]`); the
    path is cut at the first entry that is not a category name (see `clean_category_path`),
    and such items are counted.
  * Title from metadata, HTML entities/tags and extra whitespace removed. A missing title is
    passed on as '' (the builder then falls back to the asin) and counted.
  * A category without a metadata file still works: titles fall back to asins, no categories.
  * De-duplication: the 2018 5-core files repeat reviews (same user, item, time, rating, text
    and summary, often differing only in the product `style`), and metadata files repeat
    asins. The reader yields every record as read and the common timeline builder drops the
    repeats (`data_pipelines.timelines`), so each drop is counted exactly once, there.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import gzip
import html
import io
import itertools
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from data_pipelines.readers import BadLineTracker, EventChunk, Reader
from data_pipelines.records import BadInputError, RawEvent, RawItem

RATING_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)
REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")

_SUFFIX = r"\.json(?:\.gz)?"
_REVIEWS_2014 = re.compile(rf"^reviews_(?P<cat>.+?)(?P<core>_5)?{_SUFFIX}$")
_META = re.compile(rf"^(?:meta_(?P<cat>.+?)|(?P<all>All_Amazon)_Meta){_SUFFIX}$")
_REVIEWS_2018 = re.compile(
    rf"^(?:(?P<all>All_Amazon)_Review|(?P<cat>[A-Z][\w&,.-]*?))(?P<core>_5)?{_SUFFIX}$")
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
# A category name is short and is not a sentence; anything else in a 2018 path is a leaked
# product feature ("Redeemable toward millions of items storewide on Amazon.com.").
_MAX_CATEGORY_CHARS = 60

FORMAT_JSON = "json"
FORMAT_PYTHON = "python_literal"


# --------------------------------------------------------------------------- line streaming


def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parse(text: str, fmt: str):
  if fmt == FORMAT_JSON:
    return json.loads(text)
  return ast.literal_eval(text)


def sniff_format(path: str, max_lines: int = 100) -> str:
  """FORMAT_JSON or FORMAT_PYTHON: the format of the first parseable of the first lines.

  A malformed first line is left to the parser (reported as a bad line with its number).

  Raises:
    BadInputError: when none of the first `max_lines` non-blank lines parses (names the
      file and the first such line), or the file is empty.
  """
  first_error = None
  for n, (lineno, text) in enumerate(_raw_lines(path)):
    if n >= max_lines:
      break
    if isinstance(text, UnicodeDecodeError) or not text.strip():
      continue
    for fmt in (FORMAT_JSON, FORMAT_PYTHON):
      try:
        _parse(text, fmt)
        return fmt
      except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        first_error = first_error or f"{path}:{lineno}: {type(e).__name__}: {e}"
  if first_error is None:
    raise BadInputError(f"{path}: file is empty; expected one JSON record per line")
  raise BadInputError(f"no line among the first {max_lines} of {path} is a JSON object or "
                      f"a Python-literal dict; first error at {first_error}")


def _raw_lines(path: str) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
  """Yields (1-based line number, decoded line); corrupt gzip is a clear error.

  A line that is not valid UTF-8 comes as its UnicodeDecodeError (the caller reports it as
  a bad line): decoding is per line, so one bad byte does not lose the rest of the file.
  """
  for first, lines in _raw_blocks(path, 1 << 16):
    for i, raw in enumerate(lines):
      yield first + i, _decode(raw)


def iter_records(path: str, tracker: BadLineTracker,
                 fmt: str | None = None) -> Iterator[tuple[int, dict]]:
  """Streams the dict records of a JSON-lines / Python-literal-lines file.

  Blank lines are skipped; every other line is counted in `tracker`, and a line that does
  not parse to a dict is reported there as a bad line with its 1-based number.

  Args:
    path: `.json` or `.json.gz` file.
    tracker: receives line counts and bad lines.
    fmt: FORMAT_JSON or FORMAT_PYTHON; sniffed from the first line when None.

  Yields:
    (1-based line number, record dict).
  """
  yield from _parse_lines(path, _raw_lines(path), tracker, fmt or sniff_format(path))


def _parse_lines(path: str, numbered: Iterable[tuple[int, str | UnicodeDecodeError]],
                 tracker: BadLineTracker, fmt: str) -> Iterator[tuple[int, dict]]:
  """The per-line parsing of `iter_records` over (line number, text) pairs."""
  for lineno, text in numbered:
    if isinstance(text, UnicodeDecodeError):
      tracker.count_lines()
      tracker.bad(path, lineno, f"not valid UTF-8 ({text})")
      continue
    if not text.strip():
      continue
    tracker.count_lines()
    try:
      record = _parse(text, fmt)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      kind = "JSON" if fmt == FORMAT_JSON else "Python-literal"
      tracker.bad(path, lineno, f"not a valid {kind} record ({type(e).__name__}: {e})")
      continue
    if not isinstance(record, dict):
      tracker.bad(path, lineno, f"expected an object/dict, got {type(record).__name__}")
      continue
    yield lineno, record


def _decode(raw: bytes) -> str | UnicodeDecodeError:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return e


def _raw_blocks(path: str, block_lines: int,
                read_bytes: int = 1 << 23) -> Iterator[tuple[int, list[bytes]]]:
  """Yields (1-based number of the first line, up to `block_lines` lines without "\n").

  Reads big byte blocks and splits them: much faster than gzip's per-line readline.
  """
  first, tail = 1, b""
  try:
    with _open_binary(path) as f:
      while data := f.read(read_bytes):
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        for i in range(0, len(lines), block_lines):
          yield first, lines[i:i + block_lines]
          first += len(lines[i:i + block_lines])
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise BadInputError(
        f"{path}: truncated or corrupt gzip file (read {first - 1:,} complete lines before "
        f"the error: {type(e).__name__}: {e}); re-download it") from e
  if tail:
    yield first, [tail]


@dataclasses.dataclass(frozen=True)
class ReviewColumns:
  """Where the event fields are in a JSON-lines review file (for the columnar reader).

  Attributes:
    user, item, rating, time: required field names (`REVIEW_FIELDS` order).
    text, summary: optional text fields (None when the dataset has no such field).
    time_divisor: timestamps are floor-divided by this (1000 for milliseconds).
    rating_values: the valid ratings.
  """

  user: str
  item: str
  rating: str
  time: str
  text: str | None
  summary: str | None
  time_divisor: int
  rating_values: tuple[float, ...]

  @property
  def required(self) -> tuple[str, ...]:
    return (self.user, self.item, self.rating, self.time)

  def arrow_schema(self) -> pa.Schema:
    fields = [(self.user, pa.string()), (self.item, pa.string()),
              (self.rating, pa.float64()), (self.time, pa.int64())]
    fields += [(f, pa.string()) for f in (self.text, self.summary) if f]
    return pa.schema(fields)


COLUMNS = ReviewColumns(user="reviewerID", item="asin", rating="overall",
                        time="unixReviewTime", text="reviewText", summary="summary",
                        time_divisor=1, rating_values=RATING_VALUES)


def missing_reason(name: str, required: Sequence[str]) -> str:
  return f"missing required field {name!r} (need {', '.join(required)})"


def rating_reason(name: str, rating: float, values: Sequence[float]) -> str:
  return f"{name}={rating!r} is not one of {tuple(values)}"


def review_chunks(path: str, tracker: BadLineTracker, columns: ReviewColumns,
                  to_event: Callable[[dict, int], RawEvent | str], counts: collections.Counter,
                  block_lines: int = 1 << 16) -> Iterator[EventChunk]:
  """Columnar, vectorised reading of a JSON-lines review file (pyarrow's JSON parser).

  Gives exactly the events, line counts and bad lines of the per-line reader (a test
  asserts it): a block that pyarrow cannot parse whole (a malformed line, a field of an
  unexpected type) is re-read line by line with `to_event`, which names the bad line.

  Args:
    path: review file (`.json` or `.json.gz`).
    tracker: receives line counts and bad lines.
    columns: field names and conversions.
    to_event: the per-line conversion (record, row) -> RawEvent or reason string.
    counts: reader counts ('reviews_without_text' is incremented).
    block_lines: lines parsed per block.

  Yields:
    EventChunks in file order (one per block with at least one event).
  """
  options = pa_json.ParseOptions(explicit_schema=columns.arrow_schema(),
                                 unexpected_field_behavior="ignore")
  for first, lines in _raw_blocks(path, block_lines):
    keep = [i for i, line in enumerate(lines) if line.strip()]
    try:
      block = b"\n".join(lines)
      block.decode("utf-8")  # pyarrow does not validate UTF-8; the per-line path names it.
      table = pa_json.read_json(io.BytesIO(block), parse_options=options)
      if table.num_rows != len(keep):  # E.g. two objects on one line: per-line decides.
        raise ValueError(f"{table.num_rows} rows from {len(keep)} lines")
    except (pa.ArrowInvalid, ValueError):  # UnicodeDecodeError is a ValueError.
      events = []
      numbered = ((first + i, _decode(line)) for i, line in enumerate(lines))
      for lineno, record in _parse_lines(path, numbered, tracker, FORMAT_JSON):
        event = to_event(record, len(events))
        if isinstance(event, str):
          tracker.bad(path, lineno, event)
        else:
          events.append(event)
      if events:
        counts["reviews_without_text"] += sum(not e.review_text for e in events)
        yield EventChunk.from_events(events, has_text=True)
      continue
    tracker.count_lines(len(keep))
    linenos = first + np.asarray(keep, np.int64)
    bad: dict[int, str] = {}
    for name in columns.required:
      for i in np.flatnonzero(np.asarray(table[name].is_null())).tolist():
        bad.setdefault(i, missing_reason(name, columns.required))
    ratings = table[columns.rating].fill_null(columns.rating_values[0]).to_numpy()
    for i in np.flatnonzero(~np.isin(ratings, columns.rating_values)).tolist():
      bad.setdefault(i, rating_reason(columns.rating, float(ratings[i]), columns.rating_values))
    for i in sorted(bad):
      tracker.bad(path, int(linenos[i]), bad[i])
    good = np.ones(table.num_rows, bool)
    good[list(bad)] = False
    if not good.any():
      continue

    def strings(name):
      if name is None:
        return [""] * int(good.sum())
      values = table[name].to_pylist()
      return ["" if values[i] is None else values[i].strip() for i in np.flatnonzero(good)]

    texts, summaries = strings(columns.text), strings(columns.summary)
    counts["reviews_without_text"] += sum(not t for t in texts)
    yield EventChunk(
        users=table[columns.user].to_numpy(zero_copy_only=False)[good],
        items=table[columns.item].to_numpy(zero_copy_only=False)[good],
        ratings=ratings[good].astype(np.float64),
        timestamps=table[columns.time].to_numpy()[good] // columns.time_divisor,
        review_texts=np.array(texts, dtype=object),
        review_summaries=np.array(summaries, dtype=object))


def missing_field(record: dict, fields: Sequence[str]) -> str | None:
  """Returns the first of `fields` that is absent or null in `record`, else None."""
  for name in fields:
    if record.get(name) is None:
      return name
  return None


def clean_text(value) -> str:
  """Unescapes HTML entities, removes tags and collapses whitespace ('' for None)."""
  if value is None:
    return ""
  if not isinstance(value, str):
    value = str(value)
  value = html.unescape(_TAG.sub(" ", html.unescape(value)))
  return _SPACE.sub(" ", value).strip()


def name_list(value: Sequence[str] | str | None) -> list[str] | None:
  """A list of names from a list, or a string as the CLI / builder config pass it.

  Accepts "A,B", "A;B" and the str() of a list or tuple ("['A', 'B']"), which is what
  `builder.TimelineBuilderConfig` stores for a list-valued reader option.
  """
  if value is None or not isinstance(value, str):
    return None if value is None else [str(v) for v in value]
  text = value.strip()
  if text[:1] in "[(" and text:
    try:
      parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"cannot read the name list {value!r}: {e}") from None
    return [str(v) for v in parsed]
  return [v.strip() for v in re.split(r"[,;]", text) if v.strip()]


# --------------------------------------------------------------------------- metadata


def is_category_name(raw: str) -> bool:
  """Whether one entry of a category path looks like a category (not a leaked feature)."""
  if not isinstance(raw, str) or _TAG.search(raw):
    return False
  name = clean_text(raw)
  return bool(name) and len(name) <= _MAX_CATEGORY_CHARS and not name.endswith((".", "!"))


def clean_category_path(path: Sequence[str]) -> tuple[list[str], bool]:
  """Cuts a category path at its first entry that is not a category name.

  Returns:
    (cleaned path, whether anything was cut).
  """
  out = []
  for raw in path:
    if not is_category_name(raw):
      return out, True
    out.append(clean_text(raw))
  return out, False


def leaf_category(record: dict) -> tuple[tuple[str, ...], bool]:
  """The deepest leaf of an Amazon metadata record's category path.

  2018 records carry `category` (one path); 2014 records carry `categories` (a list of
  paths, of which the first is used).

  Returns:
    ((leaf,) or (), whether the path had to be cut).
  """
  path = record.get("category")
  if path is None:
    paths = record.get("categories")
    path = paths[0] if isinstance(paths, list) and paths else []
  if isinstance(path, str):
    path = [path]
  if not isinstance(path, (list, tuple)):
    return (), False
  cleaned, cut = clean_category_path(path)
  return ((cleaned[-1],) if cleaned else ()), cut


# --------------------------------------------------------------------------- file discovery


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
  """The files of one Amazon category.

  Attributes:
    category: category name as in the file names (e.g. 'Gift_Cards').
    release: '2018' or '2014' (from the review file name).
    reviews: review file path.
    meta: metadata file path, or None when absent.
    five_core: whether `reviews` is the 5-core subset.
  """

  category: str
  release: str
  reviews: str
  meta: str | None
  five_core: bool


def discover(manual_dir: str, categories: Sequence[str] | None = None,
             subset: str = "auto") -> list[CategoryFiles]:
  """Finds the Amazon review / metadata files under `manual_dir`, sorted by category.

  Args:
    manual_dir: directory searched recursively.
    categories: category names to keep (as in the file names); None keeps all found.
    subset: '5core', 'full', or 'auto' (5-core when a category has both).

  Raises:
    FileNotFoundError: no review file, or a requested category is absent.
    BadInputError: a category is present twice (e.g. two releases): select one.
  """
  if subset not in ("auto", "5core", "full"):
    raise ValueError(f"subset must be 'auto', '5core' or 'full', got {subset!r}")
  reviews: dict[str, list[tuple[str, str, bool]]] = collections.defaultdict(list)
  metas: dict[tuple[str, str], str] = {}
  for dirpath, dirnames, filenames in os.walk(manual_dir):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if m := _META.match(name):
        metas[(dirpath, m["cat"] or m["all"])] = path
      elif m := _REVIEWS_2014.match(name):
        reviews[m["cat"]].append((path, "2014", bool(m["core"])))
      elif m := _REVIEWS_2018.match(name):
        reviews[m["cat"] or m["all"]].append((path, "2018", bool(m["core"])))
  if not reviews:
    raise FileNotFoundError(
        f"no Amazon review file in {manual_dir!r}: expected <Category>_5.json.gz or "
        "<Category>.json.gz (2018 release) or reviews_<Category>_5.json.gz (2014 release)")
  if categories:
    unknown = sorted(set(categories) - set(reviews))
    if unknown:
      raise FileNotFoundError(
          f"Amazon categories {unknown} not found in {manual_dir!r}; found: "
          f"{', '.join(sorted(reviews))}")
  out = []
  for cat in sorted(categories or reviews):
    found = reviews[cat]
    if subset != "auto":
      found = [f for f in found if f[2] == (subset == "5core")]
      if not found:
        raise FileNotFoundError(f"no {subset} review file for Amazon category {cat!r}")
    elif any(f[2] for f in found):
      found = [f for f in found if f[2]]
    if len(found) > 1:
      raise BadInputError(
          f"Amazon category {cat!r} has several review files {[f[0] for f in found]}; "
          "keep one release per category in manual_dir (or select categories)")
    path, release, core = found[0]
    meta = metas.get((os.path.dirname(path), cat))
    if meta is None:  # Metadata elsewhere under manual_dir still counts.
      meta = next((p for (d, c), p in sorted(metas.items()) if c == cat), None)
    out.append(CategoryFiles(cat, release, path, meta, core))
  return out


# --------------------------------------------------------------------------- records


def review_to_event(record: dict, row: int) -> RawEvent | str:
  """Converts one review record; returns the reason string when it is unusable."""
  if name := missing_field(record, REVIEW_FIELDS):
    return missing_reason(name, REVIEW_FIELDS)
  try:
    rating = float(record["overall"])
    timestamp = int(record["unixReviewTime"])
  except (TypeError, ValueError):
    return (f"overall={record['overall']!r} / unixReviewTime={record['unixReviewTime']!r}: "
            "expected numbers")
  if rating not in RATING_VALUES:
    return rating_reason("overall", rating, RATING_VALUES)
  return RawEvent(
      user=str(record["reviewerID"]), item=str(record["asin"]), rating=rating,
      timestamp=timestamp, row=row,
      review_text=clean_review(record.get("reviewText")),
      review_summary=clean_review(record.get("summary")))


def clean_review(value) -> str:
  """Review text as written ('' for None); only surrounding whitespace is removed."""
  return "" if value is None else str(value).strip()


def iter_review_events(path: str, tracker: BadLineTracker,
                       first_row: int = 0) -> Iterator[RawEvent]:
  """Streams the RawEvents of one review file; rows count from `first_row`."""
  row = first_row
  for lineno, record in iter_records(path, tracker):
    event = review_to_event(record, row)
    if isinstance(event, str):
      tracker.bad(path, lineno, event)
      continue
    yield event
    row += 1


class AmazonReader(Reader):
  """Reads one or several Amazon categories (2018 or 2014 release) from `manual_dir`.

  Options:
    categories: category names (as in the file names) to read; default all found. A list
      or a comma-separated string.
    subset: '5core', 'full', or 'auto' (prefer 5-core).

  Attributes:
    counts: reader-side counts for the report (metadata without title, cut category
      paths, categories without metadata file, reviews without text).
  """

  name = "amazon"
  rating_values = RATING_VALUES
  has_text = True

  def __init__(self, manual_dir, *, tracker: BadLineTracker | None = None,
               categories: Sequence[str] | str | None = None, subset: str = "auto",
               **options):
    super().__init__(manual_dir, tracker=tracker, **options)
    categories = name_list(categories)
    self.files = discover(self.manual_dir, categories, subset)
    self.counts: collections.Counter = collections.Counter()

  def events(self) -> Iterator[RawEvent]:
    row = 0
    for shard in range(self.num_event_shards()):
      for event in self.shard_events(shard, first_row=row):
        yield event
        row = event.row + 1

  def event_chunks(self, chunk_size: int = 1 << 16) -> Iterator[EventChunk]:
    """Columnar events: JSON files through pyarrow, Python-literal files line by line."""
    for f in self.files:
      if sniff_format(f.reviews) == FORMAT_JSON:
        yield from review_chunks(f.reviews, self.tracker, COLUMNS, review_to_event,
                                 self.counts, block_lines=chunk_size)
        continue
      events = iter_review_events(f.reviews, self.tracker)
      while batch := list(itertools.islice(events, chunk_size)):
        self.counts["reviews_without_text"] += sum(not e.review_text for e in batch)
        yield EventChunk.from_events(batch, self.has_text)

  def num_event_shards(self) -> int:
    """Independent pieces of `events()` (one per review file), for parallel readers."""
    return len(self.files)

  def shard_events(self, shard: int, first_row: int = 0) -> Iterator[RawEvent]:
    """The events of review file `shard`; `events()` is all shards in order."""
    for event in iter_review_events(self.files[shard].reviews, self.tracker, first_row):
      if not event.review_text:
        self.counts["reviews_without_text"] += 1
      yield event

  def items(self) -> Iterator[RawItem]:
    for f in self.files:
      if f.meta is None:
        self.counts["categories_without_meta_file"] += 1
        logging.warning("Amazon category %s has no meta_%s.json.gz: titles fall back to "
                        "asins and items have no category", f.category, f.category)
        continue
      for lineno, record in iter_records(f.meta, self.tracker):
        if (asin := record.get("asin")) is None:
          self.tracker.bad(f.meta, lineno, "missing required field 'asin'")
          continue
        title = clean_text(record.get("title"))
        if not title:
          self.counts["meta_records_without_title"] += 1
        cats, cut = leaf_category(record)
        if cut:
          self.counts["meta_category_paths_cut"] += 1
        if not cats:
          self.counts["meta_records_without_category"] += 1
        yield RawItem(item=str(asin), title=title, categories=cats)

  def source_files(self) -> list[str]:
    return [p for f in self.files for p in (f.reviews, f.meta) if p]

  def describe(self) -> dict:
    out = super().describe()
    out["categories"] = {
        f.category: {"release": f.release, "five_core": f.five_core,
                     "meta": os.path.basename(f.meta) if f.meta else None}
        for f in self.files}
    out["reader_counts"] = dict(self.counts)
    return out
