"""Raw records that every dataset reader yields, and the bad-input bookkeeping they share.

A reader turns one dataset family's original files into two streams:
  * `RawEvent`: one interaction (user, item, rating, time, optional review), in file order;
  * `RawItem`: catalogue metadata (title, category names) keyed by the raw item id.
The common timeline builder (grouping per user, stable chronological sort, de-duplication,
vocabularies, protocols) consumes these, so adding a dataset means writing a reader only.
"""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass(frozen=True)
class RawEvent:
  """One interaction as read from a raw file.

  Attributes:
    user: raw user id.
    item: raw item id.
    rating: rating value as in the file (e.g. 3.5).
    timestamp: seconds since the epoch.
    row: 0-based position in the input stream; breaks timestamp ties stably.
    review_text: review body ('' when absent).
    review_summary: review summary / headline ('' when absent).
  """

  user: str
  item: str
  rating: float
  timestamp: int
  row: int
  review_text: str = ""
  review_summary: str = ""


@dataclasses.dataclass(frozen=True)
class RawItem:
  """Catalogue metadata of one raw item id.

  Attributes:
    item: raw item id.
    title: display title ('' when unknown; the builder then falls back to the id).
    categories: category names, most general first when the source has a path
      (Amazon readers pass the deepest leaf only, see PAPER.md).
  """

  item: str
  title: str
  categories: tuple[str, ...] = ()


class BadInputError(ValueError):
  """Raised for input that cannot be read; the message names file and line."""


@dataclasses.dataclass
class DropCounter:
  """Counts every record a reader or builder drops, by reason, and keeps examples.

  Nothing is ever dropped silently: each drop is counted here and ends in the
  statistics report of the preparation run.
  """

  counts: Counter = dataclasses.field(default_factory=Counter)
  examples: dict = dataclasses.field(default_factory=dict)
  max_examples: int = 5

  def drop(self, reason: str, where: str = "") -> None:
    self.counts[reason] += 1
    if where:
      self.examples.setdefault(reason, [])
      if len(self.examples[reason]) < self.max_examples:
        self.examples[reason].append(where)

  def total(self) -> int:
    return sum(self.counts.values())

  def to_json(self) -> dict:
    return {"counts": dict(self.counts), "examples": self.examples}


@dataclasses.dataclass(frozen=True)
class BadLine:
  """A raw line that could not be parsed: where it is and why."""

  path: str
  line: int  # 1-based, as an editor shows it
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"
