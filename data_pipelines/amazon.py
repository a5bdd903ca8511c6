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
and the reader skeleton live in `data_pipelines.jsonl`, shared with `data_pipelines.google_local`.

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

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Sequence

from data_pipelines import jsonl
from data_pipelines.jsonl import (ReviewColumns, clean_text, missing_field, missing_reason,
                                  name_list, negative_time_reason, rating_reason)
# Also this module's API: callers sniff an Amazon file's line format with these.
from data_pipelines.jsonl import FORMAT_JSON, FORMAT_PYTHON  # pylint: disable=unused-import
from data_pipelines.jsonl import sniff_format  # pylint: disable=unused-import
from data_pipelines.readers import BadLineTracker
from data_pipelines.records import BadInputError, RawEvent, RawItem

RATING_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)
REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")

_SUFFIX = r"\.json(?:\.gz)?"
_REVIEWS_2014 = re.compile(rf"^reviews_(?P<cat>.+?)(?P<core>_5)?{_SUFFIX}$")
_META = re.compile(rf"^(?:meta_(?P<cat>.+?)|(?P<all>All_Amazon)_Meta){_SUFFIX}$")
_REVIEWS_2018 = re.compile(
    rf"^(?:(?P<all>All_Amazon)_Review|(?P<cat>[A-Z][\w&,.-]*?))(?P<core>_5)?{_SUFFIX}$")
_TAG = re.compile(r"<[^>]*>")
# A category name is short and is not a sentence; anything else in a 2018 path is a leaked
# product feature ("Redeemable toward millions of items storewide on Amazon.com.").
_MAX_CATEGORY_CHARS = 60

COLUMNS = ReviewColumns(user="reviewerID", item="asin", rating="overall",
                        time="unixReviewTime", text="reviewText", summary="summary",
                        time_divisor=1, rating_values=RATING_VALUES)


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
  out = []
  for cat, found in jsonl.select_groups(reviews, categories, subset, core="5core",
                                        what=("Amazon category", "Amazon categories"),
                                        manual_dir=manual_dir):
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
  if timestamp < 0:
    return negative_time_reason("unixReviewTime", timestamp)
  return RawEvent(
      user=str(record["reviewerID"]), item=str(record["asin"]), rating=rating,
      timestamp=timestamp, row=row,
      review_text=clean_review(record.get("reviewText")),
      review_summary=clean_review(record.get("summary")))


def clean_review(value) -> str:
  """Review text as written ('' for None); only surrounding whitespace is removed."""
  return "" if value is None else str(value).strip()


class AmazonReader(jsonl.ReviewDumpReader):
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
  columns = COLUMNS
  to_event = staticmethod(review_to_event)

  def __init__(self, manual_dir, *, tracker: BadLineTracker | None = None,
               categories: Sequence[str] | str | None = None, subset: str = "auto",
               **options):
    super().__init__(manual_dir, tracker=tracker, **options)
    self.files = discover(self.manual_dir, name_list(categories), subset)

  def meta_to_item(self, record: dict) -> RawItem | str:
    if (asin := record.get("asin")) is None:
      return "missing required field 'asin'"
    title = clean_text(record.get("title"))
    if not title:
      self.counts["meta_records_without_title"] += 1
    cats, cut = leaf_category(record)
    if cut:
      self.counts["meta_category_paths_cut"] += 1
    if not cats:
      self.counts["meta_records_without_category"] += 1
    return RawItem(item=str(asin), title=title, categories=cats)

  def warn_no_meta(self, files: CategoryFiles) -> None:
    self.counts["categories_without_meta_file"] += 1
    logging.warning("Amazon category %s has no meta_%s.json.gz: titles fall back to "
                    "asins and items have no category", files.category, files.category)

  def describe_files(self) -> dict:
    return {"categories": {
        f.category: {"release": f.release, "five_core": f.five_core,
                     "meta": os.path.basename(f.meta) if f.meta else None}
        for f in self.files}}
