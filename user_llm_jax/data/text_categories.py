"""Frequent review summaries as per-event categories: the encoder's view of a user's writing.

The encoder embeds each event's item, rating, categories and time: ids, no text. For review
generation that leaves out what most separates one user's answers from another's, the
user's habit of writing ("Five Stars" every time, or their own words), which lives in the
summaries of their earlier reviews. With `data.text_categories = k > 0` every summary that
occurs (lowercased, whitespace-collapsed) in at least k events of the training records gets
a category id, named 'review: <summary>', and each event with such a summary carries it as
its first category (so `data.max_categories` never crops it). Rarer summaries add nothing.

The ids extend the dataset's category vocabulary, so the encoder (pretraining predicts the
next event's categories, summaries included), the text prompt (which renders category
names) and every job that reads the data through `prepared.load_splits` see the same
events. A record's target event carries its own summary's category like any event, but the
target is never part of what a model reads (the encoder reads the history before it).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from user_llm_jax.data import schema

PREFIX = "review: "


def category_words(name: str) -> str:
  """The words a category name stands for: a summary category's summary (without
  `PREFIX`), any other name as it is."""
  return name.removeprefix(PREFIX)


def normalise(text: Any) -> str:
  """A summary as counted: decoded, lowercased, runs of whitespace collapsed."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return " ".join(str(text).lower().split())


def frequent_summaries(records: Sequence[dict], min_count: int, max_count: int = 0,
                       ) -> tuple[str, ...]:
  """Normalised summaries of at least `min_count` events of `records`, commonest first.

  Each event is counted once per record that holds it (records are a user's timeline
  under leave-last-out; overlapping windows under the paper protocol count an event once
  per window). Ties are broken alphabetically, so the order is deterministic.

  Args:
    records: the training records.
    min_count: `data.text_categories`, >= 1.
    max_count: `data.max_text_categories`: keep only the commonest this many (0: all).
      A large review corpus has hundreds of thousands of summaries written twice, and
      each kept one is a row of the encoder's category table and of the bridge's text
      table (`bridge.category_text`, LLM-wide).
  """
  if min_count < 1:
    raise ValueError(f"data.text_categories must be >= 1 to build a vocabulary, got {min_count}")
  if max_count < 0:
    raise ValueError(f"data.max_text_categories must be >= 0 (0: no cap), got {max_count}")
  counts: collections.Counter = collections.Counter()
  for record in records:
    texts = record.get(schema.REVIEW_SUMMARIES)
    if texts is None:
      continue
    for text in np.asarray(texts, dtype=object).reshape(-1):
      key = normalise(text)
      if key:
        counts[key] += 1
  kept = sorted((t for t, n in counts.items() if n >= min_count),
                key=lambda t: (-counts[t], t))
  return tuple(kept[:max_count] if max_count else kept)


@dataclasses.dataclass(frozen=True)
class SummaryCategories:
  """Record map: each event whose summary is in `summaries` gets its id as first category.

  Attributes:
    summaries: the frequent normalised summaries; summary i gets category id
      `first_id + i`.
    first_id: the first new id (the size of the original category vocabulary).
  """

  summaries: tuple[str, ...]
  first_id: int

  def __post_init__(self):
    object.__setattr__(self, "_ids", {t: self.first_id + i
                                      for i, t in enumerate(self.summaries)})

  def __call__(self, record: dict) -> dict:
    texts = record.get(schema.REVIEW_SUMMARIES)
    if texts is None:
      return record
    texts = np.asarray(texts, dtype=object).reshape(-1)
    lengths = np.asarray(record[schema.CATEGORY_LENGTHS]).reshape(-1)
    cats = schema.split_categories(np.asarray(record[schema.CATEGORY_IDS]).reshape(-1),
                                   lengths)
    if len(texts) != len(cats):
      raise ValueError(f"record {record.get(schema.USER_ID)!r}: {len(texts)} review summaries "
                       f"for {len(cats)} events")
    new_cats = []
    for text, event_cats in zip(texts, cats):
      tid = self._ids.get(normalise(text))
      new_cats.append(([tid] if tid is not None else []) + [int(c) for c in event_cats])
    out = dict(record)
    out[schema.CATEGORY_IDS] = np.asarray([c for e in new_cats for c in e], np.int32)
    out[schema.CATEGORY_LENGTHS] = np.asarray([len(e) for e in new_cats], np.int32)
    return out

  def extend(self, vocab: schema.Vocabulary) -> schema.Vocabulary:
    """`vocab` with the summaries' category names appended (items keep their categories)."""
    if vocab.num_categories != self.first_id:
      raise ValueError(f"the summary ids start at {self.first_id} but the vocabulary has "
                       f"{vocab.num_categories} categories")
    metadata = dict(vocab.metadata, summary_categories=len(self.summaries))
    return dataclasses.replace(
        vocab, categories=tuple(vocab.categories) + tuple(PREFIX + t for t in self.summaries),
        metadata=metadata)


class MappedSource(Sequence):
  """A random-access source whose records pass through `fn` when read."""

  def __init__(self, source: Sequence[dict], fn):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"record {index} of a source of {n}")
    return self._fn(self._source[index % n])

  def __iter__(self):
    # Explicit: the Sequence default reads until IndexError, and an ArrayRecord source
    # raises ValueError past its end instead.
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"MappedSource({self._source!r})"
