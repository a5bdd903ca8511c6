"""Per-user grouping of raw events on Apache Beam, for dumps larger than one machine.

The in-memory timeline builder (`data_pipelines.timelines`) holds every event of a dataset
in RAM; the full Amazon 2018 dump has over 200M reviews, which does not fit. This module
runs the same grouping as a Beam pipeline:

  review files --(one reader shard per file, in parallel)--> (user, event)
    --GroupByKey--> per user: drop exact duplicates (keep the first read), stable sort by
    (timestamp, file, row) --> (user, timeline)

Rows are numbered per file, so the sort key (timestamp, shard, row) orders events exactly
as the in-memory builder's (timestamp, global row) does: the timelines are identical (a
test asserts it on the DirectRunner). Gzip files are not splittable, so reading parallelises
over files (categories / states); grouping, the memory-bound part, is distributed by user.

Use it either through the TFDS builder (which may return `GroupTimelines` from
`_generate_examples`) or stand-alone, writing the timelines as sharded JSON lines:

  python -m data_pipelines.beam_grouping --dataset=amazon --manual_dir=RAW \
      --output=OUT/timelines [--reader_options=categories=Books] \
      [--beam_pipeline_options=--runner=DataflowRunner,--project=...]

Apache Beam is an optional dependency (`pip install -e .[beam]`); it is imported only here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipelines.readers import BadLineTracker, Reader, make_reader
from data_pipelines.records import BadInputError, RawEvent

# Counters reported by the pipeline (Beam metrics, namespace `user_llm_jax`).
NAMESPACE = "user_llm_jax"
LINES_READ = "lines_read"
BAD_LINES = "bad_lines"
EVENTS_READ = "events_read"
DUPLICATES_DROPPED = "duplicate_events_dropped"
USERS = "users"

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
    events = 0
    for event in shard_events(reader, shard):
      events += 1
      yield event.user, (event.timestamp, shard, event.row, event)
    beam.metrics.Metrics.counter(NAMESPACE, LINES_READ).inc(tracker.lines_read)
    beam.metrics.Metrics.counter(NAMESPACE, BAD_LINES).inc(tracker.bad_count)
    beam.metrics.Metrics.counter(NAMESPACE, EVENTS_READ).inc(events)
    yield beam.pvalue.TaggedOutput("stats", {
        LINES_READ: tracker.lines_read, BAD_LINES: tracker.bad_count, EVENTS_READ: events,
        "bad_examples": [str(b) for b in tracker.examples]})


def _order(user_and_events) -> tuple[str, list[RawEvent]]:
  user, keyed = user_and_events
  timeline, dropped = order_timeline(keyed)
  beam.metrics.Metrics.counter(NAMESPACE, DUPLICATES_DROPPED).inc(dropped)
  beam.metrics.Metrics.counter(NAMESPACE, USERS).inc()
  return user, timeline


def _sum_stats(stats: Iterable[dict]) -> dict:
  out = {LINES_READ: 0, BAD_LINES: 0, EVENTS_READ: 0, "bad_examples": []}
  for s in stats:
    for key in (LINES_READ, BAD_LINES, EVENTS_READ):
      out[key] += s[key]
    out["bad_examples"] = (out["bad_examples"] + s["bad_examples"])[:20]
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
               max_bad_fraction: float = 0.0):
    super().__init__()
    self.dataset = dataset
    self.manual_dir = os.fspath(manual_dir)
    self.reader_options = dict(reader_options or {})
    self.max_bad_fraction = max_bad_fraction
    # Built here (on the launcher) so a missing file fails before the pipeline starts.
    reader = make_reader(dataset, self.manual_dir, **self.reader_options)
    self.num_shards = num_event_shards(reader)
    self.stats = None

  def expand(self, pbegin):
    read = (
        pbegin
        | "Shards" >> beam.Create(list(range(self.num_shards)))
        # Each shard is one file: let the runner spread them over workers.
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadShard(self.dataset, self.manual_dir, self.reader_options,
                                         self.max_bad_fraction)).with_outputs(
                                             "stats", main="events"))
    self.stats = (read.stats
                  | "SumStats" >> beam.CombineGlobally(_sum_stats)
                  | "CheckBad" >> beam.Map(check_bad_fraction, self.max_bad_fraction))
    return (read.events
            | "ByUser" >> beam.GroupByKey()
            | "Order" >> beam.Map(_order))


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
  stats[DUPLICATES_DROPPED] = counters.get(DUPLICATES_DROPPED, 0)
  stats[USERS] = counters.get(USERS, 0)
  stats["events_kept"] = stats[EVENTS_READ] - stats[DUPLICATES_DROPPED]
  with open(f"{output_prefix}.stats.json", "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  return stats


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
