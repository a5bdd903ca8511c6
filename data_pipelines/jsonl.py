"""Streaming JSON-lines review dumps (plain or gzip), shared by the Amazon and Google Local readers.

Both McAuley-lab dumps are one record per line, gzip-compressed, with review files and
metadata files side by side. This module holds what their readers have in common:

  * line streaming: `iter_records` reads a JSON-lines or Python-literal-lines file (the
    format sniffed from its first parseable line, `sniff_format`) in big byte blocks and
    reports every unusable line to a `BadLineTracker` with its file and 1-based line number;
    a corrupt gzip file or an unparseable file is a `BadInputError` naming the file; a
    last line without its line break is a bad line (the dumps end with a newline, so its
    absence means a cut file, even when the cut fell between two records); a leading
    UTF-8 byte-order mark is skipped;
  * columnar reading: `review_chunks` parses a JSON-lines review file in blocks with
    pyarrow's JSON parser, with exactly the events, line counts and bad lines of the
    per-line path (a block pyarrow cannot take whole is re-read line by line);
  * `ReviewDumpReader`, the reader skeleton over (review file, optional metadata file)
    pairs: one event shard per review file, per-line or columnar events, metadata items.
"""

from __future__ import annotations

import abc
import ast
import collections
import dataclasses
import gzip
import html
import io
import itertools
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from data_pipelines.readers import (UNTERMINATED_LAST_LINE, UTF8_BOM, BadLineTracker,
                                    EventChunk, Reader)
from data_pipelines.records import BadInputError, RawEvent, RawItem

FORMAT_JSON = "json"
FORMAT_PYTHON = "python_literal"

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


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


class _CutLine(bytes):
  """The last line of a file when it has no line break (a sign of truncation)."""


class _CutText(str):
  """A decoded `_CutLine`: parsers report it as a bad line, format sniffing reads it."""


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
    if isinstance(text, _CutText):
      tracker.bad(path, lineno, UNTERMINATED_LAST_LINE)
      continue
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
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return e
  return _CutText(text) if isinstance(raw, _CutLine) else text


def _raw_blocks(path: str, block_lines: int,
                read_bytes: int = 1 << 23) -> Iterator[tuple[int, list[bytes]]]:
  """Yields (1-based number of the first line, up to `block_lines` lines without "\n").

  Reads big byte blocks and splits them: much faster than gzip's per-line readline. A
  leading byte-order mark is dropped; a non-blank last line without "\n" comes as a
  `_CutLine` in a block of its own.
  """
  first, tail = 1, b""
  try:
    with _open_binary(path) as f:
      while data := f.read(read_bytes):
        if first == 1 and not tail:
          data = data.removeprefix(UTF8_BOM)
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
    yield first, [_CutLine(tail) if tail.strip() else tail]


# --------------------------------------------------------------------------- record fields


def missing_field(record: dict, fields: Sequence[str]) -> str | None:
  """Returns the first of `fields` that is absent or null in `record`, else None."""
  for name in fields:
    if record.get(name) is None:
      return name
  return None


def missing_reason(name: str, required: Sequence[str]) -> str:
  return f"missing required field {name!r} (need {', '.join(required)})"


def rating_reason(name: str, rating: float, values: Sequence[float]) -> str:
  return f"{name}={rating!r} is not one of {tuple(values)}"


def negative_time_reason(name: str, value: int) -> str:
  return f"timestamp must be >= 0, got {name}={value}"


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


# --------------------------------------------------------------------------- columnar reviews


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
      if isinstance(lines[-1], _CutLine):
        raise ValueError("unterminated last line")  # The per-line path reports it.
      block = b"\n".join(lines)
      block.decode("utf-8")  # pyarrow does not validate UTF-8; the per-line path names it.
      table = pa_json.read_json(io.BytesIO(block), parse_options=options)
      if table.num_rows != len(keep):  # E.g. two objects on one line: per-line decides.
        raise ValueError(f"{table.num_rows} rows from {len(keep)} lines")
    except (pa.ArrowInvalid, ValueError):  # UnicodeDecodeError is a ValueError.
      numbered = ((first + i, _decode(line)) for i, line in enumerate(lines))
      events = list(_events_of(path, _parse_lines(path, numbered, tracker, FORMAT_JSON),
                               tracker, to_event))
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
    times = table[columns.time].fill_null(0).to_numpy()
    for i in np.flatnonzero(times < 0).tolist():
      bad.setdefault(i, negative_time_reason(columns.time, int(times[i])))
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


def _events_of(path: str, records: Iterable[tuple[int, dict]], tracker: BadLineTracker,
               to_event: Callable[[dict, int], RawEvent | str],
               first_row: int = 0) -> Iterator[RawEvent]:
  """Converts (line number, record) pairs; an unusable record is a bad line, not a row."""
  row = first_row
  for lineno, record in records:
    event = to_event(record, row)
    if isinstance(event, str):
      tracker.bad(path, lineno, event)
      continue
    yield event
    row += 1


def iter_review_events(path: str, tracker: BadLineTracker,
                       to_event: Callable[[dict, int], RawEvent | str],
                       first_row: int = 0) -> Iterator[RawEvent]:
  """Streams the RawEvents of one review file (any line format); rows count from `first_row`."""
  return _events_of(path, iter_records(path, tracker), tracker, to_event, first_row)


# --------------------------------------------------------------------------- reader skeleton


def select_groups(reviews: dict[str, list[tuple]], names: Sequence[str] | None, subset: str,
                  *, core: str, what: tuple[str, str],
                  manual_dir: str) -> Iterator[tuple[str, list[tuple]]]:
  """The review files of each group (category, state) to read, by group name.

  Args:
    reviews: group name -> review file candidates, tuples whose last element says whether
      the file is the k-core subset.
    names: the groups to keep; None or empty keeps all found.
    subset: `core` (k-core files only), 'full', or 'auto' (k-core when a group has both).
    core: the name of the k-core subset ('5core', '10core').
    what: how errors name one group and several groups ('Amazon category', 'Amazon
      categories').
    manual_dir: the searched directory, for error messages.

  Yields:
    (group name, its candidates of the selected subset) in sorted order; lazily, so a
    caller's check of one group runs before the next group is looked at.

  Raises:
    FileNotFoundError: a requested group is absent, or has no file of `subset`.
  """
  if names:
    unknown = sorted(set(names) - set(reviews))
    if unknown:
      raise FileNotFoundError(
          f"{what[1]} {unknown} not found in {manual_dir!r}; found: "
          f"{', '.join(sorted(reviews))}")
  for name in sorted(names or reviews):
    found = reviews[name]
    if subset != "auto":
      found = [f for f in found if f[-1] == (subset == core)]
      if not found:
        raise FileNotFoundError(f"no {subset} review file for {what[0]} {name!r}")
    elif any(f[-1] for f in found):
      found = [f for f in found if f[-1]]
    yield name, found


class DumpFiles(Protocol):
  """What `ReviewDumpReader` needs of one group's files (a category, a state)."""

  @property
  def reviews(self) -> str:
    """The review file."""

  @property
  def meta(self) -> str | None:
    """The metadata file, or None when the group has none."""


class ReviewDumpReader(Reader):
  """A reader over groups of (review file, optional metadata file), one event shard each.

  Subclasses set `files` in `__init__` (after calling it here), the class attributes
  `columns` and `to_event`, and implement `meta_to_item`, `warn_no_meta` and
  `describe_files`.

  Attributes:
    files: the groups, in reading order.
    counts: reader-side counts for the report ('reviews_without_text' and the subclass's).
  """

  columns: ClassVar[ReviewColumns]
  # The per-line conversion (record, row) -> RawEvent or the reason it is unusable (a
  # staticmethod of the module's `review_to_event`).
  to_event: ClassVar[Callable[[dict, int], RawEvent | str]]

  def __init__(self, manual_dir, *, tracker: BadLineTracker | None = None, **options):
    super().__init__(manual_dir, tracker=tracker, **options)
    self.files: list[DumpFiles] = []
    self.counts: collections.Counter = collections.Counter()

  @abc.abstractmethod
  def meta_to_item(self, record: dict) -> RawItem | str:
    """Converts one metadata record (counting in `counts`); a string is why it is unusable."""

  @abc.abstractmethod
  def warn_no_meta(self, files: DumpFiles) -> None:
    """Counts and logs a group without metadata file."""

  @abc.abstractmethod
  def describe_files(self) -> dict:
    """The `describe()` entries naming the groups read."""

  def events(self) -> Iterator[RawEvent]:
    row = 0
    for shard in range(self.num_event_shards()):
      for event in self.shard_events(shard, first_row=row):
        yield event
        row = event.row + 1

  def event_chunks(self, chunk_size: int = 1 << 16) -> Iterator[EventChunk]:
    """Columnar events: JSON files through pyarrow, Python-literal files line by line."""
    for shard, f in enumerate(self.files):
      if sniff_format(f.reviews) == FORMAT_JSON:
        yield from review_chunks(f.reviews, self.tracker, self.columns, self.to_event,
                                 self.counts, block_lines=chunk_size)
        continue
      events = self.shard_events(shard)
      while batch := list(itertools.islice(events, chunk_size)):
        yield EventChunk.from_events(batch, self.has_text)

  def num_event_shards(self) -> int:
    """Independent pieces of `events()` (one per review file), for parallel readers."""
    return len(self.files)

  def shard_events(self, shard: int, first_row: int = 0) -> Iterator[RawEvent]:
    """The events of review file `shard`; `events()` is all shards in order."""
    path = self.files[shard].reviews
    for event in iter_review_events(path, self.tracker, self.to_event, first_row):
      if not event.review_text:
        self.counts["reviews_without_text"] += 1
      yield event

  def items(self) -> Iterator[RawItem]:
    for f in self.files:
      if f.meta is None:
        self.warn_no_meta(f)
        continue
      for lineno, record in iter_records(f.meta, self.tracker):
        item = self.meta_to_item(record)
        if isinstance(item, str):
          self.tracker.bad(f.meta, lineno, item)
          continue
        yield item

  def source_files(self) -> list[str]:
    return [p for f in self.files for p in (f.reviews, f.meta) if p]

  def describe(self) -> dict:
    out = super().describe()
    out.update(self.describe_files())
    out["reader_counts"] = dict(self.counts)
    return out
