"""Reader for the Amazon Review dumps (McAuley lab): the 2018 and the 2014 release.

Files recognised in `manual_dir` (and its sub-directories, one category per folder is fine):

  2018 release  `<Category>_5.json.gz` (5-core) or `<Category>.json.gz` (full), JSON lines
                with reviewerID, asin, overall, unixReviewTime, reviewText, summary;
                `meta_<Category>.json.gz`, JSON lines with asin, title, category (a list,
                most general first).
  2014 release  `reviews_<Category>_5.json.gz` / `reviews_<Category>.json.gz`, same review
                fields; `meta_<Category>.json.gz` whose lines are Python-literal dicts
                (single quotes, `None`) with asin, title, categories (a list of paths).

The line format (strict JSON or Python literal) is detected per file from its first line, so
either release's review or metadata file may come in either format; Python literals are parsed
with `ast.literal_eval` (never `eval`). Everything is streamed line by line.

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
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence

from data_pipelines.readers import BadLineTracker, Reader
from data_pipelines.records import BadInputError, RawEvent, RawItem

RATING_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)
REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")

_SUFFIX = r"\.json(?:\.gz)?"
_REVIEWS_2014 = re.compile(rf"^reviews_(?P<cat>.+?)(?P<core>_5)?{_SUFFIX}$")
_META = re.compile(rf"^meta_(?P<cat>.+?){_SUFFIX}$")
_REVIEWS_2018 = re.compile(rf"^(?P<cat>[A-Z][\w&,.-]*?)(?P<core>_5)?{_SUFFIX}$")
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


def sniff_format(path: str) -> str:
  """Returns FORMAT_JSON or FORMAT_PYTHON from the first non-blank line of `path`.

  Raises:
    BadInputError: when the first line is neither (names the file and line).
  """
  lineno = 0
  for lineno, text in _raw_lines(path):
    if not text.strip():
      continue
    try:
      json.loads(text)
      return FORMAT_JSON
    except ValueError:
      pass
    try:
      ast.literal_eval(text)
      return FORMAT_PYTHON
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      raise BadInputError(
          f"{path}:{lineno}: neither a JSON object nor a Python-literal dict "
          f"({type(e).__name__}: {e}); expected one record per line") from None
  raise BadInputError(f"{path}: file is empty ({lineno} blank lines); expected JSON lines")


def _raw_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line); corrupt gzip is a clear error."""
  lineno = 0
  try:
    with _open_binary(path) as f:
      for lineno, raw in enumerate(f, 1):
        try:
          yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
          # Reported by the caller as a bad line; decoding is per line so one bad byte
          # does not lose the rest of the file.
          yield lineno, e
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise BadInputError(
        f"{path}: truncated or corrupt gzip file (read {lineno:,} complete lines before "
        f"the error: {type(e).__name__}: {e}); re-download it") from e


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
  fmt = fmt or sniff_format(path)
  for lineno, text in _raw_lines(path):
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
        metas[(dirpath, m["cat"])] = path
      elif m := _REVIEWS_2014.match(name):
        reviews[m["cat"]].append((path, "2014", bool(m["core"])))
      elif m := _REVIEWS_2018.match(name):
        reviews[m["cat"]].append((path, "2018", bool(m["core"])))
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
    return f"missing required field {name!r} (need {', '.join(REVIEW_FIELDS)})"
  try:
    rating = float(record["overall"])
    timestamp = int(record["unixReviewTime"])
  except (TypeError, ValueError):
    return (f"overall={record['overall']!r} / unixReviewTime={record['unixReviewTime']!r}: "
            "expected numbers")
  if rating not in RATING_VALUES:
    return f"overall={rating!r} is not one of {RATING_VALUES}"
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
    if isinstance(categories, str):
      categories = [c.strip() for c in categories.split(",") if c.strip()]
    self.files = discover(self.manual_dir, categories, subset)
    self.counts: collections.Counter = collections.Counter()

  def events(self) -> Iterator[RawEvent]:
    row = 0
    for shard in range(self.num_event_shards()):
      for event in self.shard_events(shard, first_row=row):
        yield event
        row = event.row + 1

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
