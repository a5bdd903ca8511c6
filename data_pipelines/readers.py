"""The reader interface every dataset family implements, and the reader registry.

A reader turns one dataset family's original files (placed by the user in a
`manual_dir`) into two streams, in file order:

  * `events()`: `records.RawEvent`, one per interaction;
  * `items()`: `records.RawItem`, catalogue metadata keyed by raw item id.

Large dumps should also override `event_chunks()` (columnar, vectorised: 20M
ratings must not become 20M Python objects); the default implementation batches
`events()`, so a simple reader only writes `events()`.

Parse failures are never raised ad hoc: a reader reports each one through its
`BadLineTracker` (`self.tracker.bad(path, line, reason)`) and counts every line
it reads (`self.tracker.count_lines(n)`). The tracker enforces
`--max_bad_fraction`: with the default 0 the first bad line raises
`records.BadInputError` naming the file and line; otherwise bad lines are
counted and the run fails at the end only if their fraction is too high.

Readers are registered by dataset name in `READERS` as "module:Class" strings
and imported lazily, so the CLI and the TFDS builder need no change when a
dataset is added.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import io
import os
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np

from data_pipelines.records import BadInputError, BadLine, RawEvent, RawItem

# Dataset name -> "module:ReaderClass". Imported only when used.
READERS: dict[str, str] = {
    "movielens": "data_pipelines.movielens:MovieLensReader",
    "synthetic": "data_pipelines.movielens:SyntheticReader",
    "amazon": "data_pipelines.amazon:AmazonReader",
    "google_local": "data_pipelines.google_local:GoogleLocalReader",
}


class BadLineTracker:
  """Counts lines read and bad lines; enforces the tolerated bad-line fraction.

  Attributes:
    max_bad_fraction: tolerated fraction of bad lines among lines read (0 means
      the first bad line fails the run).
    lines_read: number of raw lines (records) read so far, bad ones included.
    bad_count: number of bad lines seen.
    examples: the first `max_examples` bad lines, for the report.
  """

  def __init__(self, max_bad_fraction: float = 0.0, max_examples: int = 20):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    self.max_bad_fraction = float(max_bad_fraction)
    self.max_examples = max_examples
    self.lines_read = 0
    self.bad_count = 0
    self.examples: list[BadLine] = []

  def count_lines(self, n: int = 1) -> None:
    """Records that `n` more raw lines were read (bad ones included)."""
    self.lines_read += int(n)

  def bad(self, path: str, line: int, reason: str) -> None:
    """Reports one malformed line (1-based `line`); raises if none are tolerated."""
    bad_line = BadLine(os.fspath(path), int(line), reason)
    self.bad_count += 1
    if len(self.examples) < self.max_examples:
      self.examples.append(bad_line)
    if self.max_bad_fraction == 0.0:
      raise BadInputError(
          f"malformed input at {bad_line} (pass --max_bad_fraction>0 to skip and "
          "count malformed lines)")

  @property
  def bad_fraction(self) -> float:
    return self.bad_count / max(self.lines_read, 1)

  def check(self) -> None:
    """Raises `BadInputError` when the bad-line fraction exceeds the tolerance."""
    if self.bad_count and self.bad_fraction > self.max_bad_fraction:
      shown = "\n  ".join(str(b) for b in self.examples[:5])
      raise BadInputError(
          f"{self.bad_count:,} of {self.lines_read:,} lines are malformed "
          f"({self.bad_fraction:.4%} > --max_bad_fraction={self.max_bad_fraction}); "
          f"first ones:\n  {shown}")

  def to_json(self) -> dict:
    return {
        "lines_read": self.lines_read,
        "bad_lines": self.bad_count,
        "bad_fraction": self.bad_fraction,
        "max_bad_fraction": self.max_bad_fraction,
        "examples": [str(b) for b in self.examples],
    }


@dataclasses.dataclass
class EventChunk:
  """A columnar batch of raw events, in file order.

  Attributes:
    users: raw user ids, object array of str, shape [n].
    items: raw item ids, object array of str, shape [n].
    ratings: rating values as in the file, float64 [n].
    timestamps: seconds since the epoch, int64 [n].
    review_texts: object array of str [n], or None when the dataset has no text.
    review_summaries: object array of str [n], or None.
  """

  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  review_texts: np.ndarray | None = None
  review_summaries: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.users)

  @classmethod
  def from_events(cls, events: Sequence[RawEvent], has_text: bool) -> "EventChunk":
    """Builds a chunk from row-wise events (keeps their order)."""
    def obj(values):
      arr = np.empty(len(events), dtype=object)
      arr[:] = values
      return arr
    return cls(
        users=obj([e.user for e in events]),
        items=obj([e.item for e in events]),
        ratings=np.fromiter((e.rating for e in events), np.float64, len(events)),
        timestamps=np.fromiter((e.timestamp for e in events), np.int64, len(events)),
        review_texts=obj([e.review_text for e in events]) if has_text else None,
        review_summaries=obj([e.review_summary for e in events]) if has_text else None,
    )


class Reader(abc.ABC):
  """Base class of dataset readers.

  Subclasses set the class attribute `name`, set `rating_values` and `has_text`
  (class or instance attributes; an instance may decide them from the files it
  finds, e.g. the MovieLens layout), and implement `events()` and `items()`.

  Attributes:
    name: dataset family name, the key in `READERS`.
    rating_values: the rating-token vocabulary (e.g. ten half stars), ascending.
    has_text: whether events carry review text / summary.
    manual_dir: directory holding the original files.
    tracker: where parse failures and line counts are reported.
  """

  name: ClassVar[str] = ""
  rating_values: tuple[float, ...] = ()
  has_text: bool = False

  def __init__(self, manual_dir: str | os.PathLike, *,
               tracker: BadLineTracker | None = None, **options):
    self.manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(self.manual_dir):
      raise FileNotFoundError(
          f"manual_dir {self.manual_dir!r} does not exist or is not a directory: "
          f"place the original {self.name or type(self).__name__} files there.")
    self.tracker = tracker if tracker is not None else BadLineTracker()
    if options:
      raise TypeError(
          f"{type(self).__name__} got unknown reader options {sorted(options)}")

  @abc.abstractmethod
  def events(self) -> Iterator[RawEvent]:
    """Yields every interaction in file order (`row` = running 0-based index)."""

  @abc.abstractmethod
  def items(self) -> Iterator[RawItem]:
    """Yields catalogue metadata; ids may repeat (the builder de-duplicates)."""

  def event_chunks(self, chunk_size: int = 1_000_000) -> Iterator[EventChunk]:
    """Yields events as columnar chunks in file order; override for speed."""
    buf: list[RawEvent] = []
    for event in self.events():
      buf.append(event)
      if len(buf) >= chunk_size:
        yield EventChunk.from_events(buf, self.has_text)
        buf = []
    if buf:
      yield EventChunk.from_events(buf, self.has_text)

  def source_files(self) -> list[str]:
    """Paths of the raw files this reader reads (for provenance in the report)."""
    return []

  def describe(self) -> dict:
    """Provenance recorded in the vocabulary metadata and statistics."""
    return {"reader": type(self).__name__, "manual_dir": self.manual_dir,
            "files": [os.path.basename(p) for p in self.source_files()]}


def get_reader_class(dataset: str) -> type[Reader]:
  """Imports and returns the reader class registered under `dataset`."""
  if dataset not in READERS:
    raise ValueError(
        f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(READERS))}")
  module_name, cls_name = READERS[dataset].split(":")
  module = importlib.import_module(module_name)
  return getattr(module, cls_name)


def make_reader(dataset: str, manual_dir: str | os.PathLike, *,
                tracker: BadLineTracker | None = None, **options) -> Reader:
  """Builds the reader registered under `dataset` for the files in `manual_dir`."""
  return get_reader_class(dataset)(manual_dir, tracker=tracker, **options)


# What Excel and Notepad put at the start of a UTF-8 file; not part of the first field.
UTF8_BOM = b"\xef\xbb\xbf"
# The bad-line reason of a last line without its line break.
UNTERMINATED_LAST_LINE = ("last line has no trailing newline: the file may be truncated "
                          "(re-download it, or end the file with a newline if the line is "
                          "complete)")


def open_text(path: str, encoding: str) -> io.TextIOWrapper:
  """Opens a text file for reading with a leading UTF-8 byte-order mark skipped.

  Line ends are kept as written (`newline=""`), so callers can tell a last line that
  lost its line break.
  """
  f = open(path, "rb")  # pylint: disable=consider-using-with
  if f.read(len(UTF8_BOM)) != UTF8_BOM:
    f.seek(0)
  return io.TextIOWrapper(f, encoding=encoding, newline="")


def is_unterminated(raw: str | bytes) -> bool:
  """True for a raw line (as read, line end included) that has no line break."""
  end = raw[-1:]
  return end not in ("\n", "\r", b"\n", b"\r")


def ends_with_newline(path: str) -> bool:
  """True when the file is empty or its last byte is a line break."""
  with open(path, "rb") as f:
    if f.seek(0, os.SEEK_END) == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return not is_unterminated(f.read(1))


def require_file(directory: str, candidates: Sequence[str], what: str) -> str:
  """Returns the first existing `directory/candidate`, or raises a clear error."""
  for name in candidates:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{what}: none of {list(candidates)} found in {directory!r}")
