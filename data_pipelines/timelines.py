"""Per-user timelines from any reader: grouping, ordering, de-duplication, vocabularies, protocols.

Common to every dataset family. Vectorised numpy over columnar `EventChunk`s so
that tens of millions of events fit in memory as a few int arrays:

1. read every event chunk, mapping raw user/item ids to dense codes and
   ratings to rating tokens;
2. drop exact repeated events (same user, item, rating, time and text; the
   first occurrence is kept) and count them;
3. optionally (`kcore_users` / `kcore_items`, off by default) keep the k-core of the
   user-item graph: repeatedly remove the users with fewer than `kcore_users` events
   and the items with fewer than `kcore_items` events (both counted on the events
   still kept, each pass removing every such user and item at once) until a pass
   removes nothing. The result is the largest event set in which every user and item
   meets its threshold, whatever the removal order; what was removed is counted;
4. sort each user's events by timestamp, ties broken stably by original row order
   (`timestamp_precision='float32'` first rounds timestamps to float32, as RecBole stores
   them: seconds since 1970 become multiples of 64-128 s, so events of a session tie and
   keep file order; reproduces RecBole's splits, off by default);
5. join item metadata (repeated metadata ids: first kept, counted; items with
   no metadata get their raw id as title and no categories, counted);
6. cut records with a protocol:
   * `leave_last_out`: train = timeline[:-2], validation = timeline[:-1],
     test = timeline; users with < 3 events are dropped (counted);
   * `paper`: users with >= window + 2 events; windows of window + 1 events,
     aligned to the end of the timeline and `stride` apart; each user's last
     window -> test, earlier windows -> train;
7. build vocabularies (PAD=0, OOV=1 reserved) from the events some TRAIN record
   covers only (under the paper protocol with stride > 1, a user's leading events
   before the first window, and gaps between windows when stride > window + 1, are
   in no train record): items below `min_item_count` and items seen only outside
   train records map to OOV_ID and are counted, never dropped.

The last event of every record is its target (see `user_llm_jax/data/schema.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import tqdm

from data_pipelines.readers import BadLineTracker, Reader
from data_pipelines.records import BadInputError, DropCounter
from user_llm_jax.data import schema

PROTOCOLS = ("leave_last_out", "paper")
TIMESTAMP_PRECISIONS = ("exact", "float32")


def round_timestamps(ts: np.ndarray, precision: str) -> np.ndarray:
  """int64 timestamps at `precision` ('exact': unchanged; 'float32': rounded to the
  nearest float32, as a float32 column stores them)."""
  if precision == "float32":
    return np.asarray(ts, np.int64).astype(np.float32).astype(np.int64)
  return np.asarray(ts, np.int64)


class EmptyDatasetError(BadInputError):
  """The input (or what survives the protocol's filters) holds no usable record."""


@dataclasses.dataclass(frozen=True)
class TimelineOptions:
  """How timelines become records.

  Attributes:
    protocol: 'leave_last_out' or 'paper'.
    window: paper protocol: history length of a record (record = window + 1 events).
    stride: paper protocol: distance between consecutive windows of a user.
    min_item_count: items with fewer occurrences in the train events -> OOV_ID.
    min_category_count: categories with fewer train occurrences -> OOV_ID.
    kcore_users: k-core filtering: users keep >= this many events (0: no user threshold).
    kcore_items: k-core filtering: items keep >= this many events (0: no item threshold).
      Applied to the de-duplicated events before the protocol cuts records; both 0
      (the default) turns the filtering off. Events are counted with repeats (a user who
      rated an item twice at different times has two events).
    timestamp_precision: 'exact' (default) or 'float32': timestamps rounded to the
      nearest float32 before anything else (kept rounded), as RecBole stores them, so
      that its splits and orderings can be reproduced (step 4 of the module docstring).
  """

  protocol: str = "leave_last_out"
  window: int = 50
  stride: int = 1
  min_item_count: int = 1
  min_category_count: int = 1
  kcore_users: int = 0
  kcore_items: int = 0
  timestamp_precision: str = "exact"

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
    if self.window < 1 or self.stride < 1:
      raise ValueError(f"window and stride must be >= 1, got {self.window}, {self.stride}")
    if self.min_item_count < 1 or self.min_category_count < 1:
      raise ValueError("min_item_count and min_category_count must be >= 1")
    if self.kcore_users < 0 or self.kcore_items < 0:
      raise ValueError(f"kcore_users and kcore_items must be >= 0 (0: off), got "
                       f"{self.kcore_users}, {self.kcore_items}")
    if self.timestamp_precision not in TIMESTAMP_PRECISIONS:
      raise ValueError(f"timestamp_precision must be one of {TIMESTAMP_PRECISIONS}, got "
                       f"{self.timestamp_precision!r}")

  @property
  def kcore(self) -> bool:
    """Whether k-core filtering applies."""
    return self.kcore_users > 1 or self.kcore_items > 1

  @property
  def splits(self) -> tuple[str, ...]:
    if self.protocol == "leave_last_out":
      return ("train", "validation", "test")
    return ("train", "test")


class _Interner:
  """Maps raw ids (any hashable, chunk by chunk) to dense int codes in first-seen order."""

  def __init__(self):
    self.codes: dict = {}
    self.raw: list[str] = []

  def __call__(self, values: np.ndarray) -> np.ndarray:
    local, uniques = pd.factorize(values, use_na_sentinel=False)
    lookup = np.empty(len(uniques), dtype=np.int32)
    for j, u in enumerate(np.asarray(uniques).tolist()):
      key = str(u)
      code = self.codes.get(key)
      if code is None:
        code = self.codes[key] = len(self.raw)
        self.raw.append(key)
      lookup[j] = code
    return lookup[local]


def _percentiles(values: np.ndarray) -> dict:
  if not len(values):
    return {}
  qs = {"p5": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95}
  out = {k: float(np.percentile(values, q)) for k, q in qs.items()}
  out.update(min=int(values.min()), max=int(values.max()), mean=float(values.mean()))
  return out


@dataclasses.dataclass
class Timelines:
  """Sorted, de-duplicated events of all kept users plus the record index.

  Event arrays are in timeline order (user by user, chronological). A record
  is a half-open slice [start, end) of them.
  """

  dataset: str
  options: TimelineOptions
  vocabulary: schema.Vocabulary
  statistics: dict
  user_raw: list[str]
  event_user: np.ndarray  # int32 [N] user code
  event_item: np.ndarray  # int32 [N] item vocabulary id (OOV_ID when unknown)
  event_item_code: np.ndarray  # int32 [N] raw item code (index into item metadata)
  event_rating: np.ndarray  # int32 [N] rating-token id
  event_ts: np.ndarray  # int64 [N]
  event_text: np.ndarray | None  # object [N] review text, or None
  event_summary: np.ndarray | None
  item_cat_offsets: np.ndarray  # int64 [num raw items + 1] CSR into item_cat_flat
  item_cat_flat: np.ndarray  # int32 category vocabulary ids
  splits: dict  # split -> int64 [R, 2] (start, end)

  def num_records(self, split: str) -> int:
    return len(self.splits[split])

  def record(self, start: int, end: int) -> dict:
    """The schema record of events [start, end)."""
    sl = slice(start, end)
    codes = self.event_item_code[sl]
    lengths = (self.item_cat_offsets[codes + 1] - self.item_cat_offsets[codes]).astype(np.int32)
    total = int(lengths.sum())
    # Flat categories: for each event, its item's slice of item_cat_flat, in order.
    first = np.repeat(self.item_cat_offsets[codes] - np.cumsum(lengths) + lengths, lengths)
    flat = self.item_cat_flat[first + np.arange(total)] if total else np.zeros(0, np.int32)
    n = end - start
    empty = np.full(n, b"", dtype=object)  # bytes: no per-element encode when writing
    return {
        schema.USER_ID: self.user_raw[self.event_user[start]],
        schema.ITEM_IDS: self.event_item[sl].astype(np.int32),
        schema.RATINGS: self.event_rating[sl].astype(np.int32),
        schema.TIMESTAMPS: self.event_ts[sl].astype(np.int64),
        schema.CATEGORY_IDS: flat.astype(np.int32),
        schema.CATEGORY_LENGTHS: lengths,
        schema.REVIEW_TEXTS: self.event_text[sl] if self.event_text is not None else empty,
        schema.REVIEW_SUMMARIES: (self.event_summary[sl] if self.event_summary is not None
                                  else empty),
        schema.FAVORITE_CATEGORY: favorite_category(flat, lengths),
    }

  def records(self, split: str) -> Iterator[tuple[str, dict]]:
    """Yields (unique key, record) of a split in a deterministic order."""
    for start, end in self.splits[split].tolist():
      yield f"{self.user_raw[self.event_user[start]]}/{start}-{end}", self.record(start, end)


def favorite_category(flat: np.ndarray, lengths: np.ndarray) -> int:
  """Most frequent real category in the history (events[:-1]); ties to the most recent.

  Args:
    flat: category ids of the record's events, flat in event order.
    lengths: number of categories of each event.

  Returns:
    The category id, or PAD_ID when the history has no real (>= FIRST_ID) category.
  """
  hist = flat[:int(lengths[:-1].sum())] if len(lengths) else flat[:0]
  valid = np.flatnonzero(hist >= schema.FIRST_ID)
  if not len(valid):
    return schema.PAD_ID
  cats = hist[valid]
  counts = np.bincount(cats)
  last = np.zeros(len(counts), dtype=np.int64) - 1
  np.maximum.at(last, cats, valid)  # most recent position of each category
  best = np.flatnonzero(counts == counts.max())
  return int(best[np.argmax(last[best])])


def _dedup_mask(user, item, rating, ts, text_codes) -> np.ndarray:
  """True for the first occurrence of each exact (user, item, rating, ts, text) event."""
  keys = [k for k in (text_codes or [])] + [rating, item, ts, user]
  order = np.lexsort(keys)  # stable: equal keys stay in row order
  same = np.ones(len(order) - 1, dtype=bool) if len(order) > 1 else np.zeros(0, bool)
  for k in keys:
    ks = k[order]
    same &= ks[1:] == ks[:-1]
  keep = np.ones(len(user), dtype=bool)
  keep[order[1:][same]] = False
  return keep


def build_timelines(reader: Reader, options: TimelineOptions,
                    show_progress: bool = True) -> Timelines:
  """Reads everything from `reader` and builds the timelines and record index.

  Raises:
    BadInputError: malformed input beyond the reader's tolerance.
    EmptyDatasetError: no events, or no record survives the protocol.
  """
  t0 = time.perf_counter()
  tracker: BadLineTracker = reader.tracker
  drops = DropCounter()
  users, items = _Interner(), _Interner()
  rating_values = np.asarray(reader.rating_values, dtype=np.float64)
  if not len(rating_values) or np.any(np.diff(rating_values) <= 0):
    raise ValueError(f"{type(reader).__name__}.rating_values must be ascending, got "
                     f"{reader.rating_values}")
  cols = {"user": [], "item": [], "rating": [], "ts": [], "text": [], "summary": []}
  bar = tqdm.tqdm(desc=f"read {reader.name}", unit="event", disable=not show_progress)
  for chunk in reader.event_chunks():
    cols["user"].append(users(chunk.users))
    cols["item"].append(items(chunk.items))
    r = np.asarray(chunk.ratings, dtype=np.float64)
    pos = np.clip(np.searchsorted(rating_values, r), 0, len(rating_values) - 1)
    ok = rating_values[pos] == r
    _count(drops, "rating_not_in_vocabulary_mapped_to_oov", int((~ok).sum()))
    cols["rating"].append(np.where(ok, pos + schema.FIRST_ID, schema.OOV_ID).astype(np.int8))
    cols["ts"].append(np.asarray(chunk.timestamps, dtype=np.int64))
    if reader.has_text:
      cols["text"].append(chunk.review_texts)
      cols["summary"].append(chunk.review_summaries)
    bar.update(len(chunk))
  bar.close()
  tracker.check()
  cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
  user, item = cat(cols["user"], np.int32), cat(cols["item"], np.int32)
  rating, ts = cat(cols["rating"], np.int8), cat(cols["ts"], np.int64)
  text = cat(cols["text"], object) if reader.has_text else None
  summary = cat(cols["summary"], object) if reader.has_text else None
  del cols
  events_read = len(user)
  if not events_read:
    raise EmptyDatasetError(f"no events read from {reader.manual_dir!r} "
                            f"({', '.join(reader.source_files()) or reader.name})")
  if len(ts) and ts.min() < 0:  # Readers report these as bad lines; this guards the rest.
    row = int(np.argmax(ts < 0))
    raise BadInputError(f"{type(reader).__name__} yielded event row {row} (0-based) with "
                        f"timestamp {int(ts[row])}: timestamp must be >= 0")

  ts = round_timestamps(ts, options.timestamp_precision)
  # Exact duplicates (the Amazon 2018 5-core files repeat reviews verbatim).
  text_codes = None
  if text is not None:
    text_codes = [pd.factorize(text)[0], pd.factorize(summary)[0]]
  keep = _dedup_mask(user, item, rating, ts, text_codes)
  num_dup = int((~keep).sum())
  _count(drops, "duplicate_event", num_dup)
  order = np.flatnonzero(keep)
  users_read, events_after_dedup = len(users.raw), len(order)
  kcore = None
  if options.kcore:
    in_core, rounds = kcore_mask(user[order], item[order], options.kcore_users,
                                 options.kcore_items)
    kcore = kcore_statistics(
        options, rounds, users_before=users_read, items_before=len(items.raw),
        events_before=events_after_dedup,
        users_left=len(np.unique(user[order[in_core]])),
        items_left=len(np.unique(item[order[in_core]])), events_left=int(in_core.sum()))
    _count_kcore(drops, kcore)
    order = order[in_core]
    if not len(order):
      raise EmptyDatasetError(
          f"k-core filtering (users >= {options.kcore_users}, items >= "
          f"{options.kcore_items} events) removed all {events_after_dedup:,} events of "
          f"{reader.manual_dir!r}")
  # Chronological per user; lexsort is stable, so ties keep the original row order.
  order = order[np.lexsort((ts[order], user[order]))]
  user, item, rating, ts = user[order], item[order], rating[order], ts[order]
  if text is not None:
    text, summary = text[order], summary[order]
  del order, keep

  # Per-user slices.
  bounds = np.flatnonzero(np.diff(user)) + 1
  u_start = np.concatenate([[0], bounds]).astype(np.int64)
  u_len = np.diff(np.concatenate([u_start, [len(user)]])).astype(np.int64)

  # Records of the protocol.
  records = _cut_records(u_start, u_len, options, drops)
  if any(len(v) == 0 for v in records.values()):
    need = 3 if options.protocol == "leave_last_out" else options.window + 2
    raise EmptyDatasetError(
        f"empty result: no user of {reader.manual_dir!r} has the >= {need} events the "
        f"{options.protocol!r} protocol needs (users read: {len(u_len):,}, max events "
        f"per user: {int(u_len.max()):,}); records per split: "
        f"{ {k: len(v) for k, v in records.items()} }")
  in_train = covered_mask(len(user), records["train"])

  # Item metadata, first occurrence of each id wins.
  meta: dict[str, tuple[str, tuple[str, ...]]] = {}
  for raw_item in reader.items():
    if raw_item.item in meta:
      drops.drop("duplicate_item_metadata", raw_item.item)
    else:
      meta[raw_item.item] = (raw_item.title, tuple(raw_item.categories))
  tracker.check()
  no_meta = [raw for raw in items.raw if raw not in meta]
  for raw in no_meta:
    drops.drop("item_without_metadata", raw)
  item_title = [meta.get(raw, (raw, ()))[0] or raw for raw in items.raw]
  item_cats = [meta.get(raw, ("", ()))[1] for raw in items.raw]

  # Item vocabulary: train events only, by descending count (ties: first seen).
  num_raw_items = len(items.raw)
  train_counts = np.bincount(item[in_train], minlength=num_raw_items)
  eligible = np.flatnonzero(train_counts >= options.min_item_count)
  below = int(((train_counts > 0) & (train_counts < options.min_item_count)).sum())
  _count(drops, "item_below_min_count_mapped_to_oov", below)
  eligible = eligible[np.argsort(-train_counts[eligible], kind="stable")]
  code_to_vocab = np.full(num_raw_items, schema.OOV_ID, dtype=np.int32)
  code_to_vocab[eligible] = np.arange(len(eligible), dtype=np.int32) + schema.FIRST_ID

  # Category vocabulary: categories of the train events' items.
  cat_counts: dict[str, int] = {}
  for code, n in zip(np.flatnonzero(train_counts).tolist(),
                     train_counts[train_counts > 0].tolist()):
    for c in item_cats[code]:
      cat_counts[c] = cat_counts.get(c, 0) + n
  cat_names = sorted((c for c, n in cat_counts.items() if n >= options.min_category_count),
                     key=lambda c: (-cat_counts[c], c))
  cat_index = {c: i + schema.FIRST_ID for i, c in enumerate(cat_names)}
  lengths = np.array([len(cs) for cs in item_cats], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  flat = np.array([cat_index.get(c, schema.OOV_ID) for cs in item_cats for c in cs],
                  dtype=np.int32)

  event_vocab = code_to_vocab[item]
  for split, recs in records.items():
    oov_targets = int((event_vocab[recs[:, 1] - 1] == schema.OOV_ID).sum())
    _count(drops, f"oov_target_{split}_counted_not_dropped", oov_targets)

  vocab_items = [schema.ItemInfo(n, n) for n in schema.reserved_prefix("item")]
  vocab_items += [schema.ItemInfo(items.raw[c], item_title[c],
                                  tuple(int(x) for x in flat[offsets[c]:offsets[c + 1]]))
                  for c in eligible.tolist()]
  vocabulary = schema.Vocabulary(
      dataset=reader.name, items=tuple(vocab_items),
      ratings=(0.0, 0.0) + tuple(float(r) for r in rating_values),
      categories=tuple(schema.reserved_prefix("category") + cat_names),
      metadata={"protocol": options.protocol, "options": dataclasses.asdict(options),
                "source": reader.describe(), "ratings_reserved": "ids 0, 1 are pad/oov"})

  kept_users = np.zeros(len(u_len), dtype=bool)
  for recs in records.values():
    kept_users[np.searchsorted(u_start, recs[:, 0], side="right") - 1] = True
  statistics = {
      "dataset": reader.name,
      "source": reader.describe(),
      "options": dataclasses.asdict(options),
      "lines_read": tracker.lines_read,
      "bad_lines": tracker.to_json(),
      "events_read": events_read,
      "duplicate_events": num_dup,
      "events_after_dedup": events_after_dedup,
      **({"kcore": kcore} if kcore else {}),
      "users_read": users_read,
      "users_kept": int(kept_users.sum()),
      "events_kept": int(u_len[kept_users].sum()),
      "items_read": num_raw_items,
      "items_in_vocabulary": int(len(eligible)),
      "items_without_metadata": len(no_meta),
      "categories_in_vocabulary": len(cat_names),
      "rating_values": [float(r) for r in rating_values],
      "events_per_user": _percentiles(u_len),
      "events_per_kept_user": _percentiles(u_len[kept_users]),
      "records_per_split": {k: int(len(v)) for k, v in records.items()},
      "drops": drops.to_json(),
      "seconds_timelines": time.perf_counter() - t0,
  }
  user_raw = users.raw
  return Timelines(
      dataset=reader.name, options=options, vocabulary=vocabulary, statistics=statistics,
      user_raw=user_raw, event_user=user, event_item=event_vocab, event_item_code=item,
      event_rating=rating.astype(np.int32), event_ts=ts, event_text=text,
      event_summary=summary, item_cat_offsets=offsets, item_cat_flat=flat,
      splits=records)


def kcore_mask(user: np.ndarray, item: np.ndarray, min_user: int,
               min_item: int) -> tuple[np.ndarray, int]:
  """The events of the (min_user, min_item)-core of the user-item event graph.

  Each pass counts events per user and per item among the events still kept and removes
  every event of a user below `min_user` or of an item below `min_item`; passes repeat
  until one removes nothing.

  Args:
    user, item: int codes of the events, [N].
    min_user, min_item: thresholds (<= 1: none).

  Returns:
    (bool [N] mask of the events kept, number of passes that removed events).
  """
  keep = np.ones(len(user), dtype=bool)
  num_users, num_items = int(user.max(initial=-1)) + 1, int(item.max(initial=-1)) + 1
  rounds = 0
  while True:
    per_user = np.bincount(user[keep], minlength=num_users)
    per_item = np.bincount(item[keep], minlength=num_items)
    drop = keep & ((per_user[user] < min_user) | (per_item[item] < min_item))
    if not drop.any():
      return keep, rounds
    keep &= ~drop
    rounds += 1


def kcore_statistics(options: TimelineOptions, rounds: int, *, users_before: int,
                     items_before: int, events_before: int, users_left: int,
                     items_left: int, events_left: int) -> dict:
  """The `kcore` section of the statistics report (in-memory and Beam builders alike)."""
  return {"kcore_users": options.kcore_users, "kcore_items": options.kcore_items,
          "rounds": rounds, "users_removed": users_before - users_left,
          "items_removed": items_before - items_left,
          "events_removed": events_before - events_left, "users_left": users_left,
          "items_left": items_left, "events_left": events_left}


def _count_kcore(drops: DropCounter, kcore: dict) -> None:
  for what in ("users", "items", "events"):
    _count(drops, f"kcore_{what}_removed", kcore[f"{what}_removed"])


def covered_mask(n: int, slices: np.ndarray) -> np.ndarray:
  """bool [n]: True for the events that at least one of the [start, end) `slices` covers."""
  depth = np.zeros(n + 1, dtype=np.int64)
  np.add.at(depth, slices[:, 0], 1)
  np.add.at(depth, slices[:, 1], -1)
  return np.cumsum(depth[:-1]) > 0


def _cut_records(u_start: np.ndarray, u_len: np.ndarray, options: TimelineOptions,
                 drops: DropCounter) -> dict:
  """Record slices [start, end) per split, as int64 [R, 2] arrays."""
  if options.protocol == "leave_last_out":
    ok = u_len >= 3
    _count_dropped_users(drops, ~ok, u_len, "user_fewer_than_3_events")
    s, n = u_start[ok], u_len[ok]
    return {"train": np.stack([s, s + n - 2], 1), "validation": np.stack([s, s + n - 1], 1),
            "test": np.stack([s, s + n], 1)}
  w, stride = options.window, options.stride
  ok = u_len >= w + 2
  _count_dropped_users(drops, ~ok, u_len, f"user_fewer_than_{w + 2}_events")
  s, n = u_start[ok], u_len[ok]
  test_start = s + n - (w + 1)
  num_train = (n - (w + 1)) // stride  # windows start at test_start - k*stride >= s
  k = np.concatenate([np.arange(m, 0, -1) for m in num_train.tolist()]) if len(n) else (
      np.zeros(0, np.int64))
  starts = np.repeat(test_start, num_train) - k.astype(np.int64) * stride
  train = np.stack([starts, starts + w + 1], 1).astype(np.int64)
  return {"train": train, "test": np.stack([test_start, test_start + w + 1], 1)}


def _count_dropped_users(drops: DropCounter, mask: np.ndarray, u_len: np.ndarray,
                         reason: str) -> None:
  _count(drops, reason, int(mask.sum()))
  _count(drops, f"events_of_{reason}", int(u_len[mask].sum()))


def _count(drops: DropCounter, reason: str, n: int) -> None:
  """Adds `n` to a drop reason (no entry at all when n == 0)."""
  if n:
    drops.counts[reason] += n
