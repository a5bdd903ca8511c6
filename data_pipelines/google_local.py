"""Reader for the Google Local Review dump (2021 release, McAuley lab).

Files recognised in `manual_dir` (and its sub-directories):

  `review-<State>.json.gz` (all reviews) or `review-<State>_10.json.gz` (10-core subset):
      JSON lines with user_id, name, time (**milliseconds** since the epoch), rating (1-5),
      text (may be null), pics, resp, gmap_id.
  `meta-<State>.json.gz`: JSON lines with gmap_id, name, category (a list, may be null), ...

Several states are combined into one dataset (a user reviewing in two states gets one
timeline); `states=` selects some.

Choices (see ../shared/PAPER.md, "Data protocol"):
  * Timestamps are converted to whole seconds (floor division by 1000), the unit of the
    timeline schema.
  * Category of an event = *every* category of the business (the metadata `category` list,
    order kept, repeats removed): businesses are genuinely multi-category ("Pizza
    restaurant", "Italian restaurant"), and the list has no hierarchy to pick a leaf from.
    This is the same multi-valued treatment as MovieLens genres; the favorite-category label
    counts each of them. A null list gives no category (counted).
  * The item title is the business name; a business without metadata falls back to its
    gmap_id (in the builder), and is counted there.
  * Review text is kept (null -> ''); Google Local has no summary field.
  * Repeated reviews and repeated gmap_ids in the metadata are yielded as read; the common
    timeline builder drops and counts them once (`data_pipelines.timelines`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Sequence

from data_pipelines import jsonl
from data_pipelines.jsonl import (ReviewColumns, clean_text, missing_field, missing_reason,
                                  name_list, negative_time_reason, rating_reason)
from data_pipelines.readers import BadLineTracker
from data_pipelines.records import BadInputError, RawEvent, RawItem

RATING_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)
REVIEW_FIELDS = ("user_id", "gmap_id", "rating", "time")

_SUFFIX = r"\.json(?:\.gz)?"
_REVIEWS = re.compile(rf"^review-(?P<state>.+?)(?P<core>_10)?{_SUFFIX}$")
_META = re.compile(rf"^meta-(?P<state>.+?){_SUFFIX}$")


@dataclasses.dataclass(frozen=True)
class StateFiles:
  """The files of one state: review file, optional metadata, whether 10-core."""

  state: str
  reviews: str
  meta: str | None
  ten_core: bool


def discover(manual_dir: str, states: Sequence[str] | None = None,
             subset: str = "auto") -> list[StateFiles]:
  """Finds the Google Local review / metadata files under `manual_dir`, sorted by state.

  Args:
    manual_dir: directory searched recursively.
    states: state names to keep (as in the file names, e.g. 'Hawaii'); None keeps all.
    subset: '10core', 'full', or 'auto' (10-core when a state has both).

  Raises:
    FileNotFoundError: no review file, or a requested state is absent.
    BadInputError: a state has the same kind of review file twice.
  """
  if subset not in ("auto", "10core", "full"):
    raise ValueError(f"subset must be 'auto', '10core' or 'full', got {subset!r}")
  reviews: dict[str, list[tuple[str, bool]]] = collections.defaultdict(list)
  metas: dict[str, list[str]] = collections.defaultdict(list)
  for dirpath, dirnames, filenames in os.walk(manual_dir):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if m := _META.match(name):
        metas[m["state"]].append(path)
      elif m := _REVIEWS.match(name):
        reviews[m["state"]].append((path, bool(m["core"])))
  if not reviews:
    raise FileNotFoundError(
        f"no Google Local review file in {manual_dir!r}: expected review-<State>.json.gz "
        "or review-<State>_10.json.gz (with meta-<State>.json.gz)")
  out = []
  for state, found in jsonl.select_groups(reviews, states, subset, core="10core",
                                          what=("Google Local state", "Google Local states"),
                                          manual_dir=manual_dir):
    if len(found) > 1 or len(metas[state]) > 1:
      raise BadInputError(
          f"Google Local state {state!r} has several files "
          f"{[f[0] for f in found] + metas[state]}; keep one copy under manual_dir")
    path, core = found[0]
    out.append(StateFiles(state, path, (metas[state] or [None])[0], core))
  return out


COLUMNS = ReviewColumns(user="user_id", item="gmap_id", rating="rating", time="time",
                        text="text", summary=None, time_divisor=1000,
                        rating_values=RATING_VALUES)


def review_to_event(record: dict, row: int) -> RawEvent | str:
  """Converts one review record; returns the reason string when it is unusable."""
  if name := missing_field(record, REVIEW_FIELDS):
    return missing_reason(name, REVIEW_FIELDS)
  try:
    rating = float(record["rating"])
    time_ms = int(record["time"])
  except (TypeError, ValueError):
    return (f"rating={record['rating']!r} / time={record['time']!r}: expected numbers "
            "(time in milliseconds)")
  if rating not in RATING_VALUES:
    return rating_reason("rating", rating, RATING_VALUES)
  if time_ms < 0:
    return negative_time_reason("time", time_ms)
  text = record.get("text")
  return RawEvent(
      user=str(record["user_id"]), item=str(record["gmap_id"]), rating=rating,
      timestamp=time_ms // 1000, row=row,
      review_text="" if text is None else str(text).strip())


def business_categories(value) -> tuple[str, ...]:
  """All category names of a business, cleaned, order kept, repeats removed."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)):
    return ()
  names = (clean_text(v) for v in value if isinstance(v, str))
  return tuple(dict.fromkeys(n for n in names if n))


class GoogleLocalReader(jsonl.ReviewDumpReader):
  """Reads one or several states of the Google Local Review dump from `manual_dir`.

  Options:
    states: state names (as in the file names) to read; default all found. A list or a
      comma-separated string.
    subset: '10core', 'full', or 'auto' (prefer 10-core).

  Attributes:
    counts: reader-side counts for the report (reviews without text, businesses without
      category or name, states without metadata file).
  """

  name = "google_local"
  rating_values = RATING_VALUES
  has_text = True
  columns = COLUMNS
  to_event = staticmethod(review_to_event)

  def __init__(self, manual_dir, *, tracker: BadLineTracker | None = None,
               states: Sequence[str] | str | None = None, subset: str = "auto",
               **options):
    super().__init__(manual_dir, tracker=tracker, **options)
    self.files = discover(self.manual_dir, name_list(states), subset)

  def meta_to_item(self, record: dict) -> RawItem | str:
    if (gmap_id := record.get("gmap_id")) is None:
      return "missing required field 'gmap_id'"
    title = clean_text(record.get("name"))
    if not title:
      self.counts["meta_records_without_name"] += 1
    cats = business_categories(record.get("category"))
    if not cats:
      self.counts["meta_records_without_category"] += 1
    return RawItem(item=str(gmap_id), title=title, categories=cats)

  def warn_no_meta(self, files: StateFiles) -> None:
    self.counts["states_without_meta_file"] += 1
    logging.warning("Google Local state %s has no meta-%s.json.gz: titles fall back "
                    "to gmap_ids and businesses have no category", files.state, files.state)

  def describe_files(self) -> dict:
    return {"states": {
        f.state: {"ten_core": f.ten_core,
                  "meta": os.path.basename(f.meta) if f.meta else None}
        for f in self.files}}
