r"""Throughput of dataset preparation at MovieLens-20M scale (synthetic data, same format).

Generates a synthetic MovieLens-format dataset (`ratings.csv`/`movies.csv`), then
prepares it with `data_pipelines.prepare.prepare_dataset` (read -> timelines ->
TFDS array_record). Each phase runs in its own fresh process so its peak
resident memory (`ru_maxrss`) is measured separately. Prints a table and writes
JSON.

  python -m experiments.benchmarks.prepare_throughput --output=/tmp/prep_bench.json
  python -m experiments.benchmarks.prepare_throughput --num_ratings=200000  # quick

ML-20M has 20,000,263 ratings by 138,493 users of 26,744 movies; the defaults
keep that shape (about 144 ratings per user) at any `--num_ratings`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

from absl import app, flags

_NUM_RATINGS: flags.FlagHolder
_NUM_USERS: flags.FlagHolder
_NUM_ITEMS: flags.FlagHolder
_PROTOCOL: flags.FlagHolder
_WINDOW: flags.FlagHolder
_STRIDE: flags.FlagHolder
_SEED: flags.FlagHolder
_WORKDIR: flags.FlagHolder
_KEEP: flags.FlagHolder
_OUTPUT: flags.FlagHolder


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a script, so that importing
  this module for its functions (tests, notebooks) never clashes with other flags."""
  global _NUM_RATINGS, _NUM_USERS, _NUM_ITEMS, _PROTOCOL, _WINDOW
  global _STRIDE, _SEED, _WORKDIR, _KEEP, _OUTPUT
  _NUM_RATINGS = flags.DEFINE_integer("num_ratings", 20_000_000, "Ratings to generate.")
  _NUM_USERS = flags.DEFINE_integer("num_users", None, "Users (default: ML-20M's ratio).")
  _NUM_ITEMS = flags.DEFINE_integer("num_items", None, "Items (default: ML-20M's 26,744, "
                                    "scaled down for small runs).")
  _PROTOCOL = flags.DEFINE_enum("protocol", "leave_last_out", ["leave_last_out", "paper"],
                                "Protocol to prepare.")
  _WINDOW = flags.DEFINE_integer("window", 50, "Paper protocol window.")
  _STRIDE = flags.DEFINE_integer("stride", 1, "Paper protocol stride.")
  _SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temp dir, "
                                 "deleted at the end unless --keep).")
  _KEEP = flags.DEFINE_bool("keep", False, "Keep the generated and prepared files.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results JSON here.")


ML20M_RATINGS, ML20M_USERS, ML20M_ITEMS = 20_000_263, 138_493, 26_744


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
  """User + system CPU time of this process (meaningful on a shared, loaded machine)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _generate(raw: str, num_users: int, num_items: int, num_ratings: int, seed: int) -> dict:
  from data_pipelines import synthetic

  t0 = time.perf_counter()
  stats = synthetic.generate(raw, num_users=num_users, num_items=num_items,
                             num_ratings=num_ratings, seed=seed)
  return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _maxrss_mib(),
          "cpu_seconds": _cpu_seconds(), "stats": stats.to_json()}


def _prepare(raw: str, out: str, protocol: str, window: int, stride: int) -> dict:
  from data_pipelines import prepare

  t0 = time.perf_counter()
  prepared = prepare.prepare_dataset("synthetic", raw, out, protocol=protocol, window=window,
                                     stride=stride, force=True)
  seconds = time.perf_counter() - t0
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(prepared.path) for f in fs)
  s = prepared.statistics
  return {"seconds": seconds, "peak_rss_mib": _maxrss_mib(), "cpu_seconds": _cpu_seconds(),
          "seconds_read_and_timelines": s["seconds_timelines"],
          "events_read": s["events_read"], "users": s["users_read"],
          "items": s["items_in_vocabulary"], "records_per_split": s["records_per_split"],
          "output_mib": size / 2**20, "path": prepared.path}


def _in_fresh_process(fn, *args) -> dict:
  """Runs fn(*args) in a new (spawned) process: its ru_maxrss is its own peak."""
  ctx = mp.get_context("spawn")
  with ctx.Pool(1) as pool:
    return pool.apply(fn, args)


def main(argv) -> None:
  del argv
  n = _NUM_RATINGS.value
  scale = n / ML20M_RATINGS
  num_users = _NUM_USERS.value or max(10, round(ML20M_USERS * scale))
  num_items = _NUM_ITEMS.value or max(200, min(ML20M_ITEMS, round(ML20M_ITEMS * scale**0.5)))
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="prepare_throughput_")
  raw, out = os.path.join(workdir, "raw"), os.path.join(workdir, "prepared")
  try:
    gen = _in_fresh_process(_generate, raw, num_users, num_items, n, _SEED.value)
    raw_mib = sum(os.path.getsize(os.path.join(raw, f)) for f in os.listdir(raw)) / 2**20
    prep = _in_fresh_process(_prepare, raw, out, _PROTOCOL.value, _WINDOW.value,
                             _STRIDE.value)
  finally:
    if not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)
  results = {
      "num_ratings": n, "num_users": num_users, "num_items": num_items,
      "protocol": _PROTOCOL.value, "window": _WINDOW.value, "stride": _STRIDE.value,
      "cpu_count": os.cpu_count(),
      "generate_seconds": gen["seconds"], "generate_peak_rss_mib": gen["peak_rss_mib"],
      "generate_ratings_per_second": n / gen["seconds"], "raw_mib": raw_mib,
      "generate_cpu_seconds": gen["cpu_seconds"], "prepare_cpu_seconds": prep["cpu_seconds"],
      "load_average_1min_at_end": os.getloadavg()[0],
      "prepare_seconds": prep["seconds"], "prepare_peak_rss_mib": prep["peak_rss_mib"],
      "prepare_events_per_second": prep["events_read"] / prep["seconds"],
      "read_and_timelines_seconds": prep["seconds_read_and_timelines"],
      "read_and_timelines_events_per_second": (prep["events_read"]
                                               / prep["seconds_read_and_timelines"]),
      "tfds_write_seconds": prep["seconds"] - prep["seconds_read_and_timelines"],
      "records_per_split": prep["records_per_split"], "output_mib": prep["output_mib"],
      "users_read": prep["users"], "items_in_vocabulary": prep["items"],
  }
  rows = [
      ("ratings", f"{n:,}"), ("users / items", f"{num_users:,} / {num_items:,}"),
      ("protocol", _PROTOCOL.value), ("raw csv size", f"{raw_mib:,.0f} MiB"),
      ("generate: wall time", f"{gen['seconds']:,.1f} s"),
      ("generate: CPU time (user+sys)", f"{gen['cpu_seconds']:,.1f} s"),
      ("generate: ratings/s", f"{results['generate_ratings_per_second']:,.0f}"),
      ("generate: peak RSS", f"{gen['peak_rss_mib']:,.0f} MiB"),
      ("prepare: wall time", f"{prep['seconds']:,.1f} s"),
      ("  read + timelines", f"{prep['seconds_read_and_timelines']:,.1f} s "
                             f"({results['read_and_timelines_events_per_second']:,.0f} events/s)"),
      ("  TFDS array_record write", f"{results['tfds_write_seconds']:,.1f} s"),
      ("prepare: CPU time (user+sys)", f"{prep['cpu_seconds']:,.1f} s"),
      ("prepare: events/s (end to end)", f"{results['prepare_events_per_second']:,.0f}"),
      ("prepare: peak RSS", f"{prep['peak_rss_mib']:,.0f} MiB"),
      ("records per split", ", ".join(f"{k} {v:,}" for k, v in prep["records_per_split"].items())),
      ("prepared size", f"{prep['output_mib']:,.0f} MiB"),
      ("load average (1 min) at end", f"{results['load_average_1min_at_end']:.1f} "
                                      f"on {os.cpu_count()} CPUs"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\nprepare_throughput")
  for k, v in rows:
    print(f"  {k.ljust(width)}  {v}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
    print(f"results written to {_OUTPUT.value}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
