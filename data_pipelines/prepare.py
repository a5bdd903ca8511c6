r"""Prepares a dataset's original files into TFDS timeline records (CLI and Python API).

Usage:
  python -m data_pipelines.prepare --dataset=movielens \
      --manual_dir=../shared/data/ml-latest-small --data_dir=/tmp/prepared \
      [--protocol=leave_last_out|paper] [--window=50] [--stride=1] \
      [--min_item_count=1] [--kcore_users=0 --kcore_items=0] [--max_bad_fraction=0] \
      [--reader_option=key=value ...]

`--kcore_users=5 --kcore_items=5` keeps the 5-core of the events (users and items with
>= 5 events each, removed iteratively until stable) before the protocol cuts records;
the report says how many users, items and events that removed, in how many passes.

Prints a statistics report (also written as JSON: `statistics.json` in the
prepared directory, and `--statistics_output` if given). A malformed input line
(with the default `--max_bad_fraction=0`), a missing file or column, or an
empty result exits with status 1 and a message naming the file and line.

The training job calls `prepare_dataset(...)`, which reuses an existing
complete preparation with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from data_pipelines import builder as builder_lib
from data_pipelines.records import BadInputError
from user_llm_jax.data import schema
from user_llm_jax.data import source as source_lib


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A complete prepared dataset on disk.

  Attributes:
    path: directory with dataset_info.json, vocabulary.json, statistics.json.
    vocabulary: its vocabularies.
    statistics: its preparation report.
    reused: True when an existing preparation was reused.
  """

  path: str
  vocabulary: schema.Vocabulary
  statistics: dict
  reused: bool = False

  @property
  def splits(self) -> list[str]:
    return list(self.statistics["records_per_split"])


def prepare_dataset(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    protocol: str = "leave_last_out", window: int = 50, stride: int = 1,
                    min_item_count: int = 1, min_category_count: int = 1,
                    max_bad_fraction: float = 0.0, reader_options: dict | None = None,
                    force: bool = False, show_progress: bool = True,
                    beam_pipeline_options: list[str] | None = None,
                    kcore_users: int = 0, kcore_items: int = 0,
                    timestamp_precision: str = "exact") -> PreparedDataset:
  """Prepares (or reuses) `dataset` from `manual_dir` into `data_dir`.

  Args:
    dataset: registered reader name ('movielens', 'synthetic', 'amazon', ...).
    manual_dir: directory with the original files.
    data_dir: TFDS data root; the output goes to
      `data_dir/user_timelines/<config name>/<version>/`.
    protocol, window, stride, min_item_count, min_category_count: see
      `data_pipelines.timelines.TimelineOptions`.
    max_bad_fraction: tolerated fraction of malformed lines (0: first one fails).
    reader_options: extra keyword options for the reader.
    force: re-prepare even when a complete preparation exists.
    show_progress: progress bars.
    beam_pipeline_options: None prepares in memory; a list (possibly empty) of Beam
      pipeline flags prepares on Apache Beam (`data_pipelines.beam_grouping`).
    kcore_users, kcore_items: k-core filtering thresholds (0: off); part of the prepared
      dataset's config name and settings.
    timestamp_precision: 'exact' (default) or 'float32' (RecBole's rounding; see
      `data_pipelines.timelines`); part of the config name.

  Returns:
    The `PreparedDataset`.

  Raises:
    BadInputError: malformed input, missing column, or empty result.
    FileNotFoundError: `manual_dir` or a required file is missing.
  """
  import tensorflow_datasets as tfds

  config = builder_lib.TimelineBuilderConfig.make(
      dataset, protocol=protocol, window=window, stride=stride,
      min_item_count=min_item_count, min_category_count=min_category_count,
      max_bad_fraction=max_bad_fraction, reader_options=reader_options,
      kcore_users=kcore_users, kcore_items=kcore_items,
      timestamp_precision=timestamp_precision)
  manual_dir, data_dir = os.fspath(manual_dir), os.fspath(data_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir {manual_dir!r} does not exist or is not a directory")
  beam_kwargs, builder_cls = {}, builder_lib.UserTimelines
  if beam_pipeline_options is not None:
    from data_pipelines import beam_grouping  # Optional extra [beam].
    beam_kwargs = beam_grouping.download_config_kwargs(beam_pipeline_options)
    builder_cls = beam_grouping.BeamUserTimelines
  builder = builder_cls(config=config, data_dir=data_dir, show_progress=show_progress)
  path = os.fspath(builder.data_dir)
  fingerprint = source_fingerprint(manual_dir)
  if not force and _is_complete(path, config, fingerprint):
    return _load(path, reused=True)
  t0 = time.perf_counter()
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if os.path.exists(path) else (
      tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, download_mode=mode,
          compute_stats=tfds.download.ComputeStatsMode.SKIP, **beam_kwargs))
  seconds = time.perf_counter() - t0
  stats_path = os.path.join(path, builder_lib.STATISTICS_FILENAME)
  statistics = source_lib.load_statistics(path)
  statistics["source_fingerprint"] = fingerprint
  statistics["seconds_total"] = seconds
  statistics["events_per_second"] = statistics["events_read"] / max(seconds, 1e-9)
  statistics["records_per_second"] = (sum(statistics["records_per_split"].values())
                                      / max(seconds, 1e-9))
  builder_lib.write_statistics(stats_path, statistics)
  return _load(path, reused=False)


def source_fingerprint(manual_dir: str) -> dict:
  """Absolute path plus (size, mtime) of every raw file: detects changed input."""
  files = {}
  for d, _, names in os.walk(manual_dir):
    for name in names:
      st = os.stat(os.path.join(d, name))
      files[os.path.relpath(os.path.join(d, name), manual_dir)] = [st.st_size, st.st_mtime_ns]
  return {"manual_dir": os.path.abspath(manual_dir), "files": dict(sorted(files.items()))}


def _is_complete(path: str, config: builder_lib.TimelineBuilderConfig,
                 fingerprint: dict) -> bool:
  """A finished preparation with the same settings of the same raw files."""
  needed = (source_lib.DATASET_INFO, schema.VOCAB_FILENAME, builder_lib.STATISTICS_FILENAME)
  if not all(os.path.exists(os.path.join(path, f)) for f in needed):
    return False
  try:
    stats = source_lib.load_statistics(path)
  except (OSError, json.JSONDecodeError):
    return False
  return (stats.get("settings") == config.settings()
          and stats.get("source_fingerprint") == fingerprint)


def _load(path: str, reused: bool) -> PreparedDataset:
  return PreparedDataset(
      path=path, vocabulary=schema.Vocabulary.load(os.path.join(path, schema.VOCAB_FILENAME)),
      statistics=source_lib.load_statistics(path), reused=reused)


def format_report(statistics: dict) -> str:
  """Human-readable statistics table (thousands separators)."""
  def n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else (f"{x:,.1f}" if isinstance(x, float) else str(x))

  s = statistics
  opts = s["options"]
  rows = [
      ("dataset", f"{s['dataset']} ({s['source'].get('layout', s['source']['reader'])})"),
      ("protocol", opts["protocol"] + (f" (window {opts['window']}, stride {opts['stride']})"
                                       if opts["protocol"] == "paper" else "")),
      ("lines read", n(s["lines_read"])),
      ("bad lines", f"{n(s['bad_lines']['bad_lines'])} "
                    f"(max_bad_fraction {s['bad_lines']['max_bad_fraction']})"),
      ("ratings/events read", n(s["events_read"])),
      ("duplicate events dropped", n(s["duplicate_events"])),
      ("users read", n(s["users_read"])),
      ("users kept", n(s["users_kept"])),
      ("events kept", n(s["events_kept"])),
  ]
  precision = s.get("options", {}).get("timestamp_precision", "exact")
  if precision != "exact":
    rows.insert(-2, ("timestamps", f"rounded to {precision} before ordering"))
  if "kcore" in s:
    k = s["kcore"]
    rows.insert(-2, ("k-core", (
        f"users >= {k['kcore_users']}, items >= {k['kcore_items']} events: removed "
        f"{n(k['users_removed'])} users, {n(k['items_removed'])} items, "
        f"{n(k['events_removed'])} events in {k['rounds']} pass(es); left "
        f"{n(k['users_left'])} users, {n(k['items_left'])} items, "
        f"{n(k['events_left'])} events")))
  rows += [
      ("items read", n(s["items_read"])),
      ("items in vocabulary", n(s["items_in_vocabulary"])),
      ("items without metadata", n(s["items_without_metadata"])),
      ("categories in vocabulary", n(s["categories_in_vocabulary"])),
  ]
  pct = s["events_per_user"]
  rows.append(("events/user (all users)", "  ".join(
      f"{k} {n(pct[k]) if k != 'max' else n(int(pct[k]))}"
      for k in ("p5", "p25", "p50", "p75", "p95", "max"))))
  for split, count in s["records_per_split"].items():
    rows.append((f"records[{split}]", n(count)))
  for reason, count in sorted(s["drops"]["counts"].items()):
    rows.append((f"counted: {reason}", n(count)))
  for key in ("seconds_total", "events_per_second", "records_per_second"):
    if key in s:
      rows.append((key.replace("_", " "), n(float(s[key]))))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv) -> None:
  from absl import flags  # CLI only

  del argv
  f = flags.FLAGS
  options = {}
  for kv in f.reader_option:
    key, sep, value = kv.partition("=")
    if not sep:
      sys.exit(f"ERROR: --reader_option expects key=value, got {kv!r}")
    options[key] = value
  try:
    prepared = prepare_dataset(
        f.dataset, f.manual_dir, f.data_dir, protocol=f.protocol, window=f.window,
        stride=f.stride, min_item_count=f.min_item_count,
        min_category_count=f.min_category_count, max_bad_fraction=f.max_bad_fraction,
        reader_options=options, force=f.force,
        beam_pipeline_options=f.beam_pipeline_options if f.beam else None,
        kcore_users=f.kcore_users, kcore_items=f.kcore_items,
        timestamp_precision=f.timestamp_precision)
  except (BadInputError, FileNotFoundError, ValueError, TypeError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"\n{'reused' if prepared.reused else 'prepared'}: {prepared.path}")
  print(format_report(prepared.statistics))
  if f.statistics_output:
    builder_lib.write_statistics(f.statistics_output, prepared.statistics)
    print(f"statistics written to {f.statistics_output}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("dataset", "movielens", "Dataset name (see data_pipelines.readers).")
  flags.DEFINE_string("manual_dir", None, "Directory with the original files.", required=True)
  flags.DEFINE_string("data_dir", None, "Output TFDS data root.", required=True)
  flags.DEFINE_enum("protocol", "leave_last_out", ["leave_last_out", "paper"],
                    "Evaluation protocol.")
  flags.DEFINE_integer("window", 50, "Paper protocol: history window length.")
  flags.DEFINE_integer("stride", 1, "Paper protocol: window stride.")
  flags.DEFINE_integer("min_item_count", 1, "Items rarer in train become OOV.")
  flags.DEFINE_integer("min_category_count", 1, "Categories rarer in train become OOV.")
  flags.DEFINE_integer("kcore_users", 0, "k-core filtering: keep users with >= this many "
                       "events, iterated with --kcore_items until stable (0: off).")
  flags.DEFINE_integer("kcore_items", 0, "k-core filtering: keep items with >= this many "
                       "events, iterated with --kcore_users until stable (0: off).")
  flags.DEFINE_enum("timestamp_precision", "exact", ["exact", "float32"],
                    "float32: round timestamps as RecBole stores them (reproduces its "
                    "splits; events of a session tie and keep file order).")
  flags.DEFINE_float("max_bad_fraction", 0.0, "Tolerated fraction of malformed lines.")
  flags.DEFINE_multi_string("reader_option", [], "key=value option for the reader.")
  flags.DEFINE_bool("force", False, "Re-prepare even if a complete preparation exists.")
  flags.DEFINE_string("statistics_output", None, "Also write the statistics JSON here.")
  flags.DEFINE_bool("beam", False, "Prepare on Apache Beam (pip install -e .[beam]).")
  flags.DEFINE_list("beam_pipeline_options", [], "Beam pipeline flags with --beam, e.g. "
                    "--runner=DataflowRunner,--project=P (default: in-process runner).")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
