"""Per-user grouping of raw events on Apache Beam, for dumps larger than one machine.

The in-memory timeline builder (`data_pipelines.timelines`) holds every event of a dataset
in RAM; the full Amazon 2018 dump has over 200M reviews, which does not fit. This module
runs the same grouping as a Beam pipeline:

  review files --(one reader shard per file, in parallel)--> (user, event)
    --GroupByKey--> per user: drop exact duplicates (keep the first read), stable sort by
    (timestamp, file, row) --> (user, timeline)

Rows are numbered per file, so the sort key (timestamp, shard, row) orders events exactly
as the in-memory builder's (timestamp, global row) does: the timelines are identical (tests
assert it with the DirectRunner's in-process engine and with the BundleBasedDirectRunner). Gzip files are not splittable, so reading parallelises
over files (categories / states); grouping, the memory-bound part, is distributed by user.

On top of the grouping, `BeamUserTimelines` is the TFDS builder of `data_pipelines.builder`
prepared entirely on Beam: optional k-core filtering (`kcore_filter`: the passes of
`timelines.kcore_mask` unrolled up to `KCORE_MAX_ROUNDS`, item counts as a side input),
protocol cuts per user, item / category vocabularies from train
counts (only the per-item tables meet on one worker), records, `vocabulary.json` and
`statistics.json`, identical to the in-memory builder's output (tested). Use it through

  python -m data_pipelines.prepare --dataset=amazon --manual_dir=RAW --data_dir=OUT --beam \
      [--beam_pipeline_options=--runner=DataflowRunner,--project=...]

or run the grouping alone, writing the timelines as sharded JSON lines:

  python -m data_pipelines.beam_grouping --dataset=amazon --manual_dir=RAW \
      --output=OUT/timelines [--reader_options=categories=Books] \
      [--beam_pipeline_options=--runner=DataflowRunner,--project=...]

Apache Beam is an optional dependency (`pip install -e .[beam]`); it is imported only here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipelines import builder as builder_lib
from data_pipelines import timelines as timelines_lib
from data_pipelines.readers import BadLineTracker, Reader, make_reader
from data_pipelines.records import BadInputError, RawEvent
from data_pipelines.timelines import TimelineOptions
from user_llm_jax.data import schema

# Counters reported by the pipeline (Beam metrics, namespace `user_llm_jax`).
NAMESPACE = "user_llm_jax"
LINES_READ = "lines_read"
BAD_LINES = "bad_lines"
EVENTS_READ = "events_read"
DUPLICATES_DROPPED = "duplicate_events_dropped"
USERS = "users"
RATINGS_OFF_SCALE = "ratings_off_scale"

# One event keyed for ordering: (timestamp, shard, row within shard, event).
KeyedEvent = tuple[int, int, int, RawEvent]


def dedup_key(event: RawEvent) -> tuple:
  """What makes two events the same review: everything but the row."""
  return (event.user, event.item, event.timestamp, event.rating, event.review_text,
          event.review_summary)


def num_event_shards(reader: Reader) -> int:
  """How many independent event shards a reader offers (1 when it has no shards)."""
  return reader.num_event_shards() if hasattr(reader, "num_event_shards") else 1


def shard_events(reader: Reader, shard: int) -> Iterator[RawEvent]:
  """Events of one shard, rows counted from 0 within the shard."""
  if hasattr(reader, "shard_events"):
    return reader.shard_events(shard)
  if shard != 0:
    raise ValueError(f"{type(reader).__name__} has a single event shard, got {shard}")
  return reader.events()


def order_timeline(keyed: Iterable[KeyedEvent]) -> tuple[list[RawEvent], int]:
  """Drops exact duplicates (first read kept) and sorts stably by time then read order.

  Args:
    keyed: one user's events with their (timestamp, shard, row) keys, in any order.

  Returns:
    (chronological events, number of duplicates dropped).
  """
  by_read_order = sorted(keyed, key=lambda k: (k[1], k[2]))
  seen, kept = set(), []
  for key in by_read_order:
    fingerprint = dedup_key(key[3])
    if fingerprint in seen:
      continue
    seen.add(fingerprint)
    kept.append(key)
  kept.sort(key=lambda k: k[0])  # Stable: ties stay in read order.
  return [k[3] for k in kept], len(by_read_order) - len(kept)


class ReadShard(beam.DoFn):
  """Reads one reader shard (a review file) into (user, keyed event) pairs.

  The reader is rebuilt on the worker from picklable arguments (dataset name, manual_dir,
  options). With `max_bad_fraction` 0 the first bad line fails the pipeline with the
  file and line number; otherwise bad lines are counted in Beam metrics and in the
  `stats` output, and `check_bad_fraction` applies the tolerance to the global totals.
  """

  def __init__(self, dataset: str, manual_dir: str, reader_options: dict,
               max_bad_fraction: float = 0.0):
    super().__init__()
    self._args = (dataset, manual_dir, dict(reader_options), max_bad_fraction)

  def process(self, shard: int):
    dataset, manual_dir, options, max_bad_fraction = self._args
    # A per-shard tracker with tolerance 1 (never raises mid-shard when bad lines are
    # tolerated); the fraction is checked globally once every shard is counted.
    tracker = BadLineTracker(max_bad_fraction if max_bad_fraction == 0.0 else 1.0)
    reader = make_reader(dataset, manual_dir, tracker=tracker, **options)
    events = off_scale = 0
    valid_ratings = set(reader.rating_values)
    for event in shard_events(reader, shard):
      events += 1
      off_scale += event.rating not in valid_ratings
      yield event.user, (event.timestamp, shard, event.row, event)
    beam.metrics.Metrics.counter(NAMESPACE, LINES_READ).inc(tracker.lines_read)
    beam.metrics.Metrics.counter(NAMESPACE, BAD_LINES).inc(tracker.bad_count)
    beam.metrics.Metrics.counter(NAMESPACE, EVENTS_READ).inc(events)
    yield beam.pvalue.TaggedOutput("stats", {
        LINES_READ: tracker.lines_read, BAD_LINES: tracker.bad_count, EVENTS_READ: events,
        RATINGS_OFF_SCALE: off_scale, "bad_examples": [str(b) for b in tracker.examples],
        "reader_counts": dict(getattr(reader, "counts", {}))})


def _order(user_and_events, with_first_seen: bool = False):
  user, keyed = user_and_events
  keyed = list(keyed)
  timeline, dropped = order_timeline(keyed)
  beam.metrics.Metrics.counter(NAMESPACE, DUPLICATES_DROPPED).inc(dropped)
  beam.metrics.Metrics.counter(NAMESPACE, USERS).inc()
  if with_first_seen:  # (shard, row) of the user's first line: the in-memory user order.
    return user, min((k[1], k[2]) for k in keyed), timeline, dropped
  return user, timeline


def _sum_stats(stats: Iterable[dict]) -> dict:
  """Adds up per-shard statistics (counts, reader counts; keeps 20 bad-line examples)."""
  summed = (LINES_READ, BAD_LINES, EVENTS_READ, RATINGS_OFF_SCALE, "meta_records")
  out = {**dict.fromkeys(summed, 0), "bad_examples": [], "reader_counts": {}}
  for s in stats:
    for key in summed:
      out[key] += s.get(key, 0)
    out["bad_examples"] = (out["bad_examples"] + s["bad_examples"])[:20]
    for key, n in s.get("reader_counts", {}).items():
      out["reader_counts"][key] = out["reader_counts"].get(key, 0) + n
  return out


def check_bad_fraction(stats: dict, max_bad_fraction: float) -> dict:
  """Raises `BadInputError` when the global bad-line fraction exceeds the tolerance."""
  fraction = stats[BAD_LINES] / max(stats[LINES_READ], 1)
  if stats[BAD_LINES] and fraction > max_bad_fraction:
    shown = "\n  ".join(stats["bad_examples"][:5])
    raise BadInputError(
        f"{stats[BAD_LINES]:,} of {stats[LINES_READ]:,} lines are malformed "
        f"({fraction:.4%} > --max_bad_fraction={max_bad_fraction}); first ones:\n  {shown}")
  return stats


class GroupTimelines(beam.PTransform):
  """PBegin -> PCollection[(user, list[RawEvent])]: the per-user chronological timelines.

  The totals (lines read, bad lines, events read) are in `self.stats` after expansion: a
  one-element PCollection of a dict, checked against `max_bad_fraction`. Duplicates
  dropped and users are Beam metrics (`DUPLICATES_DROPPED`, `USERS`).
  """

  def __init__(self, dataset: str, manual_dir: str, reader_options: dict | None = None,
               max_bad_fraction: float = 0.0, with_first_seen: bool = False):
    super().__init__()
    self.with_first_seen = with_first_seen
    self.dataset = dataset
    self.manual_dir = os.fspath(manual_dir)
    self.reader_options = dict(reader_options or {})
    self.max_bad_fraction = max_bad_fraction
    # Built here (on the launcher) so a missing file fails before the pipeline starts.
    reader = make_reader(dataset, self.manual_dir, **self.reader_options)
    self.num_shards = num_event_shards(reader)
    self.rating_values = tuple(reader.rating_values)
    self.has_text = bool(reader.has_text)
    self.stats = None
    self.keyed_events = None

  def expand(self, pbegin):
    read = (
        pbegin
        | "Shards" >> beam.Create(list(range(self.num_shards)))
        # Each shard is one file: let the runner spread them over workers.
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadShard(self.dataset, self.manual_dir, self.reader_options,
                                         self.max_bad_fraction)).with_outputs(
                                             "stats", main="events"))
    self.keyed_events = read.events
    self.stats = (read.stats
                  | "SumStats" >> beam.CombineGlobally(_sum_stats)
                  | "CheckBad" >> beam.Map(check_bad_fraction, self.max_bad_fraction))
    return (read.events
            | "ByUser" >> beam.GroupByKey()
            | "Order" >> beam.Map(_order, self.with_first_seen))


def timeline_to_json(user_and_timeline: tuple[str, Sequence[RawEvent]]) -> str:
  """One JSON line per user: {"user", "events": [[item, rating, timestamp, text, summary]]}."""
  user, timeline = user_and_timeline
  return json.dumps({"user": user, "events": [
      [e.item, e.rating, e.timestamp, e.review_text, e.review_summary] for e in timeline]},
                    ensure_ascii=False)


def timeline_from_json(line: str) -> tuple[str, list[RawEvent]]:
  """Inverse of `timeline_to_json` (rows renumbered 0..n-1 within the user)."""
  obj = json.loads(line)
  return obj["user"], [RawEvent(obj["user"], item, rating, ts, row, text, summary)
                       for row, (item, rating, ts, text, summary) in enumerate(obj["events"])]


def make_pipeline(pipeline_args: Sequence[str] = ()) -> beam.Pipeline:
  """A Beam pipeline from command-line style options.

  Without `--runner`, the in-process FnApiRunner is used: it is the engine Beam's
  DirectRunner delegates batch pipelines to, minus the DirectRunner's first attempt to
  download a Prism binary from the internet (which fails or stalls on offline machines).
  """
  options = PipelineOptions(list(pipeline_args))
  if any(a.startswith("--runner") for a in pipeline_args):
    return beam.Pipeline(options=options)
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return beam.Pipeline(runner=FnApiRunner(), options=options)


def run(dataset: str, manual_dir: str, output_prefix: str,
        reader_options: dict | None = None, max_bad_fraction: float = 0.0,
        pipeline_args: Sequence[str] = ()) -> dict:
  """Groups a dump on Beam and writes `<output_prefix>-SSSSS-of-NNNNN.jsonl.gz` + stats.

  Returns:
    The statistics written to `<output_prefix>.stats.json`: lines read, bad lines, events
    read, duplicates dropped, users, events kept.
  """
  group = GroupTimelines(dataset, manual_dir, reader_options, max_bad_fraction)
  pipeline = make_pipeline(pipeline_args)
  timelines = pipeline | "Group" >> group
  _ = (timelines
       | "ToJson" >> beam.Map(timeline_to_json)
       | "Write" >> beam.io.WriteToText(output_prefix, file_name_suffix=".jsonl.gz"))
  _ = (group.stats
       | "StatsJson" >> beam.Map(json.dumps)
       | "WriteStats" >> beam.io.WriteToText(output_prefix, file_name_suffix=".read.json",
                                             shard_name_template=""))
  result = pipeline.run()
  result.wait_until_finish()
  with open(f"{output_prefix}.read.json", encoding="utf-8") as f:
    stats = json.loads(f.read())
  counters = {r.key.metric.name: r.committed
              for r in result.metrics().query()["counters"]
              if r.key.metric.namespace == NAMESPACE}
  stats.pop("meta_records", None)  # Metadata is not read by the grouping.
  stats[DUPLICATES_DROPPED] = counters.get(DUPLICATES_DROPPED, 0)
  stats[USERS] = counters.get(USERS, 0)
  stats["events_kept"] = stats[EVENTS_READ] - stats[DUPLICATES_DROPPED]
  with open(f"{output_prefix}.stats.json", "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  return stats


# --------------------------------------------------------------------------- k-core filter
# Beam graphs have no loops: the passes of `timelines.kcore_mask` are unrolled up to this
# bound, and a preparation whose last unrolled pass still removed events fails (raise the
# bound, or prepare in memory). Passes after convergence remove nothing and cost little.
KCORE_MAX_ROUNDS = 24


class _KcorePass(beam.DoFn):
  """One k-core pass over one user: the events of kept users on kept items.

  As in `timelines.kcore_mask`, the user's and the items' event counts are those at the
  start of the pass (the items' come as a side input), so each pass removes the same
  events in both builders.
  """

  def __init__(self, min_user: int, min_item: int):
    super().__init__()
    self._min_user, self._min_item = min_user, min_item

  def process(self, row, item_counts):
    user, first_seen, timeline, dropped = row
    kept = [] if len(timeline) < self._min_user else [
        e for e in timeline if item_counts[e.item] >= self._min_item]
    if len(kept) < len(timeline):
      yield beam.pvalue.TaggedOutput("removed", (len(timeline) - len(kept), int(not kept)))
    if kept:
      yield user, first_seen, kept, dropped


def _add_up(rows: Iterable[tuple[int, ...]]) -> tuple[int, int]:
  """Element-wise sum of (a, b) pairs ((0, 0) for none): a CombineGlobally function."""
  a = b = 0
  for x, y in rows:
    a, b = a + x, b + y
  return a, b


def _kcore_summary(unused, before, after, items_left, *removed) -> dict:
  del unused
  events = [n for n, _ in removed]
  return {"users_before": before[0], "events_before": before[1], "users_left": after[0],
          "events_left": after[1], "items_left": items_left,
          "rounds": sum(n > 0 for n in events), "converged": not events[-1]}


def kcore_filter(grouped, options: TimelineOptions, max_rounds: int | None = None):
  """The k-core of (user, first_seen, timeline, dropped) rows, as `timelines.kcore_mask`.

  Returns:
    (the rows of users left, with their timelines filtered; a one-element PCollection of
    the summary dict: users / events before and left, items left, passes, convergence).
  """
  max_rounds = max_rounds or KCORE_MAX_ROUNDS
  pipeline = grouped.pipeline
  size = lambda label, rows: (rows | f"{label}Pairs" >> beam.Map(lambda r: (1, len(r[2])))
                              | f"{label}Sum" >> beam.CombineGlobally(_add_up))
  before = size("KcoreBefore", grouped)
  current, removed = grouped, []
  for r in range(max_rounds):
    counts = (current
              | f"KcoreItems{r}" >> beam.FlatMap(lambda row: [(e.item, 1) for e in row[2]])
              | f"KcoreCount{r}" >> beam.CombinePerKey(sum))
    step = current | f"KcorePass{r}" >> beam.ParDo(
        _KcorePass(options.kcore_users, options.kcore_items),
        beam.pvalue.AsDict(counts)).with_outputs("removed", main="kept")
    removed.append(step.removed | f"KcoreRemoved{r}" >> beam.CombineGlobally(_add_up))
    current = step.kept
  items_left = (current | "KcoreItemsLeft" >> beam.FlatMap(lambda row: {e.item for e in row[2]})
                | "KcoreDistinct" >> beam.Distinct()
                | "KcoreCountItems" >> beam.combiners.Count.Globally())
  summary = (pipeline | "KcoreSeed" >> beam.Create([None])
             | "KcoreSummary" >> beam.Map(
                 _kcore_summary, beam.pvalue.AsSingleton(before),
                 beam.pvalue.AsSingleton(size("KcoreAfter", current)),
                 beam.pvalue.AsSingleton(items_left),
                 *[beam.pvalue.AsSingleton(x) for x in removed]))
  return current, summary


# --------------------------------------------------------------------------- TFDS builder
# The same records, vocabularies and statistics as `timelines.build_timelines`, computed
# user by user on Beam. Only the per-item tables (counts, metadata, vocabulary) meet on
# one worker: their size is the catalogue's, not the event log's.

_KEY_ROW_BITS, _KEY_RECORD_BITS = 40, 20


def cut_user(n: int, options: TimelineOptions) -> tuple[dict, list[tuple[int, int]]]:
  """Record slices [start, end) per split of one n-event timeline, and train coverage.

  The per-user form of `timelines._cut_records`: same protocols, same windows.

  Returns:
    (split -> slices, the disjoint [start, end) runs of events some train record covers:
    the vocabularies count these events only).
  """
  if options.protocol == "leave_last_out":
    if n < 3:
      return {}, []
    return {"train": [(0, n - 2)], "validation": [(0, n - 1)], "test": [(0, n)]}, [(0, n - 2)]
  w, stride = options.window, options.stride
  if n < w + 2:
    return {}, []
  test_start = n - (w + 1)
  num_train = test_start // stride
  starts = [test_start - k * stride for k in range(num_train, 0, -1)]
  records = {"train": [(s, s + w + 1) for s in starts], "test": [(test_start, n)]}
  return records, merge_slices(records["train"])


def merge_slices(slices: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """The union of [start, end) slices sorted by start, as disjoint runs."""
  runs: list[tuple[int, int]] = []
  for start, end in slices:
    if runs and start <= runs[-1][1]:
      runs[-1] = (runs[-1][0], max(runs[-1][1], end))
    else:
      runs.append((start, end))
  return runs


def record_key(first_seen: tuple[int, int], index: int) -> int:
  """Integer key ordering records by user (first line read) then record index."""
  shard, row = first_seen
  if row >= 1 << _KEY_ROW_BITS or index >= 1 << _KEY_RECORD_BITS:
    raise ValueError(f"record key overflow: row {row}, record {index}")
  return ((shard << _KEY_ROW_BITS | row) << _KEY_RECORD_BITS) | index


class _ReadItems(beam.DoFn):
  """All metadata records of the reader as (item, (index, title, categories)) + stats."""

  def __init__(self, dataset: str, manual_dir: str, reader_options: dict,
               max_bad_fraction: float):
    super().__init__()
    self._args = (dataset, manual_dir, dict(reader_options), max_bad_fraction)

  def process(self, unused):
    dataset, manual_dir, options, max_bad_fraction = self._args
    tracker = BadLineTracker(max_bad_fraction if max_bad_fraction == 0.0 else 1.0)
    reader = make_reader(dataset, manual_dir, tracker=tracker, **options)
    n = 0
    for n, it in enumerate(reader.items(), 1):
      yield it.item, (n, it.title, tuple(it.categories))
    yield beam.pvalue.TaggedOutput("stats", {
        LINES_READ: tracker.lines_read, BAD_LINES: tracker.bad_count, "meta_records": n,
        "bad_examples": [str(b) for b in tracker.examples],
        "reader_counts": dict(getattr(reader, "counts", {}))})


def _item_row(joined) -> list:
  """(item, {first, train, meta}) -> [(item, first_seen, train_count, meta)] if read."""
  item, parts = joined
  if not parts["first"]:
    return []  # Metadata of an item nobody interacted with.
  meta = parts["meta"][0] if parts["meta"] else None
  return [(item, parts["first"][0], sum(parts["train"]), meta)]


def make_vocabulary(rows: list, options: TimelineOptions) -> dict:
  """Item and category vocabularies from per-item rows, exactly as the in-memory builder.

  Returns:
    {"item_map": raw id -> (vocab id, category ids), "items": ItemInfo JSON rows,
     "categories": names, "counts": statistics}.
  """
  rows = sorted(rows, key=lambda r: r[1])  # First-seen order = the in-memory item codes.
  count = {r[0]: r[2] for r in rows}
  eligible = sorted((r for r in rows if r[2] >= options.min_item_count),
                    key=lambda r: -r[2])  # Stable: ties keep first-seen order.
  cat_counts: dict[str, int] = {}
  for item, _, n, meta in rows:
    for c in (meta[2] if meta and n else ()):
      cat_counts[c] = cat_counts.get(c, 0) + n
  names = sorted((c for c, n in cat_counts.items() if n >= options.min_category_count),
                 key=lambda c: (-cat_counts[c], c))
  cat_index = {c: i + schema.FIRST_ID for i, c in enumerate(names)}
  vocab_id = {r[0]: i + schema.FIRST_ID for i, r in enumerate(eligible)}
  item_map, items = {}, []
  for item, _, _, meta in rows:
    cats = tuple(cat_index.get(c, schema.OOV_ID) for c in (meta[2] if meta else ()))
    item_map[item] = (vocab_id.get(item, schema.OOV_ID), cats)
  for item, _, _, meta in eligible:
    items.append([item, (meta[1] if meta else "") or item, list(item_map[item][1])])
  return {"item_map": item_map, "items": items, "categories": names, "counts": {
      "items_read": len(rows), "items_in_vocabulary": len(eligible),
      "items_without_metadata": sum(r[3] is None for r in rows),
      "categories_in_vocabulary": len(names),
      "item_below_min_count": sum(0 < n < options.min_item_count for n in count.values())}}


class _EncodeUser(beam.DoFn):
  """One user's timeline -> (int key, schema record) per split (tagged by split name)."""

  def __init__(self, rating_values: Sequence[float], has_text: bool):
    super().__init__()
    self._ratings = {float(r): i + schema.FIRST_ID for i, r in enumerate(rating_values)}
    self._has_text = has_text

  def process(self, user_row, vocab):
    user, first_seen, timeline, records = user_row
    item_map = vocab["item_map"]
    ids, cats = zip(*(item_map[e.item] for e in timeline))
    ratings = [self._ratings.get(float(e.rating), schema.OOV_ID) for e in timeline]
    for split, slices in records.items():
      oov = 0
      for index, (start, end) in enumerate(slices):
        lengths = np.array([len(c) for c in cats[start:end]], np.int32)
        flat = np.array([c for cs in cats[start:end] for c in cs], np.int32)
        events = timeline[start:end]
        text = lambda f: np.array([f(e) if self._has_text else "" for e in events], object)
        oov += ids[end - 1] == schema.OOV_ID
        yield beam.pvalue.TaggedOutput(split, (record_key(first_seen, index), {
            schema.USER_ID: user,
            schema.ITEM_IDS: np.array(ids[start:end], np.int32),
            schema.RATINGS: np.array(ratings[start:end], np.int32),
            schema.TIMESTAMPS: np.array([e.timestamp for e in events], np.int64),
            schema.CATEGORY_IDS: flat, schema.CATEGORY_LENGTHS: lengths,
            schema.REVIEW_TEXTS: text(lambda e: e.review_text),
            schema.REVIEW_SUMMARIES: text(lambda e: e.review_summary),
            schema.FAVORITE_CATEGORY: timelines_lib.favorite_category(flat, lengths)}))
      yield beam.pvalue.TaggedOutput("oov", (split, oov))


def _write_side_files(unused, out_dir, settings, options, describe, rating_values,
                      max_bad_fraction, read, meta, users, dups, vocab, oov, kcore) -> None:
  """Checks the totals, then writes vocabulary.json and statistics.json into `out_dir`."""
  del unused
  if kcore and not kcore["converged"]:
    raise RuntimeError(
        f"k-core filtering (users >= {options.kcore_users}, items >= {options.kcore_items} "
        f"events) still removed events in its last of {kcore['rounds']} unrolled passes on "
        "Beam: raise data_pipelines.beam_grouping.KCORE_MAX_ROUNDS, or prepare in memory "
        "(without --beam)")
  lines, bad = read[LINES_READ] + meta[LINES_READ], read[BAD_LINES] + meta[BAD_LINES]
  check_bad_fraction({LINES_READ: lines, BAD_LINES: bad,
                      "bad_examples": read["bad_examples"] + meta["bad_examples"]},
                     max_bad_fraction)
  lengths = np.array([u[0] for u in users], np.int64)
  kept = np.array([u[1] for u in users], bool)
  records = {s: n for s, n, _ in oov}
  if not read[EVENTS_READ] or not records or not all(records.values()):
    raise timelines_lib.EmptyDatasetError(
        f"empty result for {describe['manual_dir']!r} under the {options.protocol!r} "
        f"protocol: records per split {records}")
  counts = {"duplicate_event": dups,
            "rating_not_in_vocabulary_mapped_to_oov": read[RATINGS_OFF_SCALE],
            "duplicate_item_metadata": meta["meta_records"] - meta["distinct"],
            "item_without_metadata": vocab["counts"]["items_without_metadata"],
            "item_below_min_count_mapped_to_oov": vocab["counts"]["item_below_min_count"]}
  need = 3 if options.protocol == "leave_last_out" else options.window + 2
  reason = f"user_fewer_than_{need}_events"
  counts[reason] = int((~kept).sum())
  counts[f"events_of_{reason}"] = int(lengths[~kept].sum())
  counts.update({f"oov_target_{s}_counted_not_dropped": n for s, _, n in oov})
  kcore_stats = {}
  if kcore:
    kcore_stats = {"kcore": timelines_lib.kcore_statistics(
        options, kcore["rounds"], users_before=kcore["users_before"],
        items_before=vocab["counts"]["items_read"], events_before=kcore["events_before"],
        users_left=kcore["users_left"], items_left=kcore["items_left"],
        events_left=kcore["events_left"])}
    counts.update({f"kcore_{what}_removed": kcore_stats["kcore"][f"{what}_removed"]
                   for what in ("users", "items", "events")})
  reader_counts = {k: read["reader_counts"].get(k, 0) + meta["reader_counts"].get(k, 0)
                   for k in {**read["reader_counts"], **meta["reader_counts"]}}
  source = {**describe, "reader_counts": reader_counts, "engine": "apache_beam"}
  opts = dataclasses.asdict(options)
  vocabulary = schema.Vocabulary.from_json({
      "dataset": describe["dataset"],
      "items": [[n, n, []] for n in schema.reserved_prefix("item")] + vocab["items"],
      "ratings": [0.0, 0.0] + [float(r) for r in rating_values],
      "categories": schema.reserved_prefix("category") + vocab["categories"],
      "metadata": {"protocol": options.protocol, "options": opts, "source": source,
                   "ratings_reserved": "ids 0, 1 are pad/oov"}})
  statistics = {
      "dataset": describe["dataset"], "source": source, "options": opts,
      "lines_read": lines,
      "bad_lines": {"lines_read": lines, "bad_lines": bad, "bad_fraction": bad / max(lines, 1),
                    "max_bad_fraction": max_bad_fraction,
                    "examples": (read["bad_examples"] + meta["bad_examples"])[:20]},
      "events_read": read[EVENTS_READ], "duplicate_events": dups,
      "events_after_dedup": kcore["events_before"] if kcore else int(lengths.sum()),
      **kcore_stats, "users_read": kcore["users_before"] if kcore else len(users),
      "users_kept": int(kept.sum()), "events_kept": int(lengths[kept].sum()),
      **{k: v for k, v in vocab["counts"].items() if k != "item_below_min_count"},
      "rating_values": [float(r) for r in rating_values],
      "events_per_user": timelines_lib._percentiles(lengths),  # pylint: disable=protected-access
      "events_per_kept_user": timelines_lib._percentiles(lengths[kept]),  # pylint: disable=protected-access
      "records_per_split": records,
      "drops": {"counts": {k: v for k, v in counts.items() if v}, "examples": {}},
      "settings": settings}
  for name, obj in ((schema.VOCAB_FILENAME, vocabulary.to_json()),
                    (builder_lib.STATISTICS_FILENAME, statistics)):
    with FileSystems.create(os.path.join(out_dir, name)) as f:
      f.write(json.dumps(obj, indent=1, ensure_ascii=False,
                         default=builder_lib._json_default).encode("utf-8"))  # pylint: disable=protected-access


def build_splits(pipeline: beam.Pipeline, config, manual_dir: str, out_dir: str) -> dict:
  """Adds the whole preparation to `pipeline`; returns split -> PCollection[(key, record)].

  Args:
    pipeline: the Beam pipeline (TFDS's, when called from the builder).
    config: a `builder.TimelineBuilderConfig`.
    manual_dir: directory with the original files.
    out_dir: where vocabulary.json and statistics.json are written.
  """
  options, reader_options = config.options(), dict(config.reader_options)
  if options.timestamp_precision != "exact":
    raise ValueError(f"timestamp_precision={options.timestamp_precision!r} is prepared by "
                     "the in-memory builder only (it exists to reproduce small benchmark "
                     "splits); prepare without --beam")
  group = GroupTimelines(config.dataset, manual_dir, reader_options, config.max_bad_fraction,
                         with_first_seen=True)
  grouped = pipeline | "Group" >> group
  # Before the k-core filter, which may remove users: every duplicate is counted.
  dups = grouped | "Dups" >> beam.Map(lambda r: r[3]) | "SumDups" >> beam.CombineGlobally(sum)
  if options.kcore:
    grouped, kcore = kcore_filter(grouped, options)
  else:
    kcore = pipeline | "NoKcore" >> beam.Create([None])
  users = grouped | "Cut" >> beam.MapTuple(
      lambda u, first, tl, dropped: (u, first, tl, cut_user(len(tl), options), dropped))
  user_stats = (users | "UserStats" >> beam.Map(lambda r: (len(r[2]), bool(r[3][0])))
                | "UserList" >> beam.combiners.ToList())
  train = (users | "TrainItems" >> beam.FlatMap(
      lambda r: [(e.item, 1) for start, end in r[3][1] for e in r[2][start:end]])
           | "CountTrain" >> beam.CombinePerKey(sum))
  first = (group.keyed_events
           | "ItemFirst" >> beam.Map(lambda kv: (kv[1][3].item, (kv[1][1], kv[1][2])))
           | "MinFirst" >> beam.CombinePerKey(min))
  meta_read = (pipeline | "MetaSeed" >> beam.Create([None])
               | "ReadMeta" >> beam.ParDo(_ReadItems(
                   config.dataset, manual_dir, reader_options, config.max_bad_fraction)
                                          ).with_outputs("stats", main="items"))
  meta = meta_read.items | "FirstMeta" >> beam.CombinePerKey(min)
  distinct = meta | "CountMeta" >> beam.combiners.Count.Globally()
  meta_stats = (meta_read.stats | "SumMeta" >> beam.CombineGlobally(_sum_stats)
                | "AddDistinct" >> beam.Map(lambda s, d: {**s, "distinct": d},
                                            beam.pvalue.AsSingleton(distinct)))
  vocab = ({"first": first, "train": train, "meta": meta}
           | "Join" >> beam.CoGroupByKey() | "ItemRows" >> beam.FlatMap(_item_row)
           | "Rows" >> beam.combiners.ToList()
           | "Vocab" >> beam.Map(make_vocabulary, options))
  encoded = (users | "Records" >> beam.Map(lambda r: (r[0], r[1], r[2], r[3][0]))
             | "Encode" >> beam.ParDo(_EncodeUser(group.rating_values, group.has_text),
                                      beam.pvalue.AsSingleton(vocab)
                                      ).with_outputs("oov", *options.splits))
  oov = (encoded.oov | "SumOov" >> beam.CombinePerKey(sum)
         | "OovList" >> beam.combiners.ToList())
  counts = {s: encoded[s] | f"Count_{s}" >> beam.combiners.Count.Globally()
            for s in options.splits}
  oov = oov | "WithCounts" >> beam.Map(
      lambda pairs, **n: [(s, n[s], dict(pairs).get(s, 0)) for s in options.splits],
      **{s: beam.pvalue.AsSingleton(c) for s, c in counts.items()})
  describe = {**make_reader(config.dataset, manual_dir, **reader_options).describe(),
              "dataset": config.dataset}
  _ = (pipeline | "SideSeed" >> beam.Create([None])
       | "SideFiles" >> beam.Map(
           _write_side_files, out_dir, config.settings(), options, describe,
           group.rating_values, config.max_bad_fraction,
           beam.pvalue.AsSingleton(group.stats), beam.pvalue.AsSingleton(meta_stats),
           beam.pvalue.AsSingleton(user_stats), beam.pvalue.AsSingleton(dups),
           beam.pvalue.AsSingleton(vocab), beam.pvalue.AsSingleton(oov),
           beam.pvalue.AsSingleton(kcore)))
  return {s: encoded[s] for s in options.splits}


class BeamUserTimelines(builder_lib.UserTimelines, skip_registration=True):
  """`builder.UserTimelines` prepared on Apache Beam (same output, same directory).

  Pass `beam_runner` / `beam_options` in `tfds.download.DownloadConfig`
  (`data_pipelines.prepare --beam` does).
  """

  name = builder_lib.BUILDER_NAME

  def _split_generators(self, dl_manager, pipeline):
    return build_splits(pipeline, self.builder_config, os.fspath(dl_manager.manual_dir),
                        os.fspath(self.data_dir))


def download_config_kwargs(pipeline_args: Sequence[str] = ()) -> dict:
  """`beam_runner` / `beam_options` for `tfds.download.DownloadConfig`.

  Without `--runner` in `pipeline_args`, the in-process FnApiRunner runs the pipeline.
  """
  kwargs = {"beam_options": PipelineOptions(list(pipeline_args))}
  if not any(a.startswith("--runner") for a in pipeline_args):
    kwargs["beam_runner"] = default_runner()
  return kwargs


def default_runner():
  """The in-process FnApiRunner (see `make_pipeline` for why not the DirectRunner)."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return FnApiRunner()


def _main(argv: Sequence[str]) -> None:
  from absl import app, flags  # Local: importing the module defines no flags.

  del argv
  f = flags.FLAGS
  options = {}
  for kv in f.reader_options:
    if "=" not in kv:
      raise app.UsageError(f"--reader_options entry {kv!r} is not key=value")
    key, value = kv.split("=", 1)
    options[key] = value.split(";") if ";" in value else value
  stats = run(f.dataset, f.manual_dir, f.output, options, f.max_bad_fraction,
              [a for a in f.beam_pipeline_options if a])
  print(json.dumps({k: v for k, v in stats.items() if k != "bad_examples"}, indent=2))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("dataset", None, "Reader name (amazon, google_local, movielens).",
                      required=True)
  flags.DEFINE_string("manual_dir", None, "Directory with the original files.",
                      required=True)
  flags.DEFINE_string("output", None, "Output prefix of the timeline shards.", required=True)
  flags.DEFINE_list("reader_options", [], "key=value reader options, e.g. "
                    "categories=Books (use ';' inside a value for several).")
  flags.DEFINE_float("max_bad_fraction", 0.0, "Tolerated fraction of malformed lines.")
  flags.DEFINE_list("beam_pipeline_options", [], "Beam pipeline flags, comma-separated.")
  app.run(_main)
