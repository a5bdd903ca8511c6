r"""Batch inference throughput: the User-LLM vs the text-prompt baseline on the same users.

  python -m experiments.benchmarks.infer_throughput --workdir=/tmp/user_llm_main \
      --split=test --max_users=64 --output=/tmp/infer_throughput.json

On a main-job workdir, its User-LLM (`WORKDIR/user_llm`) and its text-prompt baseline
(`WORKDIR/text_baseline`) answer the same users: the first `--max_users` records of
`--split` (or the users of `--history_file`). Each run is the command a user runs,
`python -m experiments.main --mode=infer`, in its own process, writing a fresh answers file
under `--out_dir`; the two modes alternate for `--repeats` rounds so that load from other
processes hits both alike. From each run's summary (`jobs/infer.py`):

  users/s          answered users / seconds of the whole loop (the first batch compiles)
  after 1st        the same without the first batch: the steady state
  s/user           1 / users/s after the first batch
  ratio            User-LLM users/s / text-prompt users/s (> 1: the User-LLM is faster)
  prompt tokens    mean real prompt length per task (the text prompt carries the history)
  part s/user      seconds per user of each part: ranking the catalogue (`top_items`: the
                   item head, or titles by exact scoring / beam search) and each task's
                   greedy answer; the parts both modes answer compare like for like

Each mode answers what its run is set up to answer (`--mode=infer`'s docstring): with the
main config, the User-LLM ranks the catalogue with its item head and writes the favourite
genre; the text prompt, scored on the favourite genre alone, writes the genre. Medians over
rounds; the JSON keeps every run's summary. Process start and model loading are outside
the measured loop (reported as `process_seconds`).

  python -m experiments.benchmarks.infer_throughput --workdir=/tmp/main_smoke \
      --max_users=12 --output=/tmp/infer_smoke.json   # a main.py:smoke workdir
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from experiments.benchmarks import reporting
from user_llm_jax import answer_log

REPO = pathlib.Path(__file__).resolve().parents[2]
# mode -> its run inside a main-job workdir ('' : `--mode=infer` finds the `user_llm` stage)
MODES = {"user_llm": "", "text_prompt": "text_baseline"}
LABELS = {"user_llm": "User-LLM", "text_prompt": "text prompt"}

_WORKDIR: flags.FlagHolder
_SPLIT: flags.FlagHolder
_HISTORY_FILE: flags.FlagHolder
_MAX_USERS: flags.FlagHolder
_TOP_K: flags.FlagHolder
_REPEATS: flags.FlagHolder
_OUT_DIR: flags.FlagHolder
_OUTPUT: flags.FlagHolder
_PLOT: flags.FlagHolder


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a script."""
  global _WORKDIR, _SPLIT, _HISTORY_FILE, _MAX_USERS, _TOP_K, _REPEATS, _OUT_DIR
  global _OUTPUT, _PLOT
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished main-job workdir (with "
                                 "user_llm/ and text_baseline/ stages).", required=True)
  _SPLIT = flags.DEFINE_string("split", "test", "The prepared split whose records are "
                               "answered (ignored with --history_file).")
  _HISTORY_FILE = flags.DEFINE_string("history_file", None, "Answer the users of this "
                                      "history file instead of a split.")
  _MAX_USERS = flags.DEFINE_integer("max_users", 64, "The first N users (0: all).")
  _TOP_K = flags.DEFINE_integer("top_k", 10, "Catalogue items ranked per user.")
  _REPEATS = flags.DEFINE_integer("repeats", 1, "Rounds of both modes (median reported).")
  _OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the answers files go (default "
                                 "WORKDIR/infer_throughput); they are rewritten each run.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results JSON here.")
  _PLOT = flags.DEFINE_string("plot", None, "Write a bar plot here (default: the --output "
                              "path with .png).")


def mode_dirs(workdir: str) -> dict[str, str]:
  """Each mode's `--workdir` for `--mode=infer`.

  Raises:
    FileNotFoundError: a stage of the main job is missing.
  """
  out = {}
  for mode, stage in MODES.items():
    path = os.path.join(workdir, stage) if stage else workdir
    run = os.path.join(workdir, stage or "user_llm", "run.json")
    if not os.path.exists(run):
      raise FileNotFoundError(f"{run} does not exist: --workdir must be a finished main "
                              "job (python -m experiments.main "
                              "--config=experiments/configs/main.py --workdir=DIR)")
    out[mode] = path
  return out


def infer_command(run_dir: str, output: str, *, split: str | None, history_file: str | None,
                  max_users: int, top_k: int) -> list[str]:
  """The launcher command answering the users with the run in `run_dir`."""
  cmd = [sys.executable, "-m", "experiments.main",
         "--config=experiments/configs/main.py",   # unused: the run carries its own config
         "--mode=infer", f"--workdir={run_dir}", f"--output={output}",
         f"--max_users={max_users}", f"--top_k={top_k}"]
  cmd.append(f"--history_file={history_file}" if history_file else f"--split={split}")
  return cmd


def _answered_keys(path: str) -> list[Any]:
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  return [line.get("record", line["user_id"]) for line in lines]


def run_once(mode: str, run_dir: str, output: str, **inputs: Any) -> dict[str, Any]:
  """One fresh `--mode=infer` process; returns its summary (+ process seconds, users)."""
  for path in (output, answer_log.summary_path(output)):
    if os.path.exists(path):
      os.remove(path)   # a fresh file: nothing kept from an earlier run
  start = time.perf_counter()
  proc = subprocess.run(infer_command(run_dir, output, **inputs), cwd=REPO,
                        capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"--mode=infer ({mode}) failed with status {proc.returncode}:\n"
                       + proc.stderr[-3000:])
  with open(answer_log.summary_path(output), encoding="utf-8") as f:
    summary = json.load(f)["summary"]
  return dict(summary, mode=mode, process_seconds=seconds, keys=_answered_keys(output))


def _median(values: list[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def _row(mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The median figures of one mode's runs."""
  first = runs[0]
  answered = first["answered_now"]
  parts = sorted({p for r in runs for p in r["seconds_by_part"]})
  after = _median([r["users_per_sec_after_first_batch"] for r in runs])
  return {
      "mode": mode, "run": first["run"], "users": answered, "batch_size": first["batch_size"],
      "users_per_sec": _median([r["users_per_sec"] for r in runs]),
      "users_per_sec_after_first_batch": after,
      "sec_per_user": 1.0 / after if after else None,
      "first_batch_seconds": _median([r["first_batch_seconds"] for r in runs]),
      "process_seconds": _median([r["process_seconds"] for r in runs]),
      "part_sec_per_user": {p: _median([r["seconds_by_part"].get(p, 0.0) / answered
                                       for r in runs]) for p in parts},
      "mean_prompt_tokens": first["mean_prompt_tokens"],
      "max_new_tokens": first["max_new_tokens"], "tasks": first["tasks"],
      "ranking": first["ranking"]}


def run_benchmark(workdir: str, *, split: str | None = "test",
                  history_file: str | None = None, max_users: int = 64, top_k: int = 10,
                  repeats: int = 1, out_dir: str | None = None) -> dict[str, Any]:
  """Runs both modes `repeats` times on the same users; returns the results dict."""
  workdir = os.path.abspath(workdir)
  dirs = mode_dirs(workdir)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "infer_throughput"))
  os.makedirs(out_dir, exist_ok=True)
  inputs = {"split": None if history_file else split, "history_file": history_file,
            "max_users": max_users, "top_k": top_k}
  results: dict[str, Any] = {
      "workdir": workdir, "input": history_file or f"split {split}", "top_k": top_k,
      "max_users": max_users, "repeats": repeats, "cpu_count": os.cpu_count(),
      "load_average_start": os.getloadavg(), "runs": []}
  for round_ in range(repeats):
    # Alternate the order so that neither mode always runs first.
    order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
    for mode in order:
      output = os.path.join(out_dir, f"{mode}.jsonl")
      command = " ".join(infer_command(dirs[mode], output, **inputs)[1:])
      print(f"[round {round_ + 1}/{repeats}] {mode}: python {command}", flush=True)
      results["runs"].append(run_once(mode, dirs[mode], output, **inputs))
  keys = {r["mode"]: r.pop("keys") for r in results["runs"]}
  if keys["user_llm"] != keys["text_prompt"]:
    raise RuntimeError("the two modes answered different users: "
                       f"{keys['user_llm'][:5]} ... vs {keys['text_prompt'][:5]} ...")
  results["same_users"] = True
  results["rows"] = [_row(m, [r for r in results["runs"] if r["mode"] == m]) for m in MODES]
  ullm, text = results["rows"]
  results["users"] = ullm["users"]
  for key in ("users_per_sec", "users_per_sec_after_first_batch"):
    results[f"ratio_{key}"] = (ullm[key] / text[key] if ullm[key] and text[key] else None)
  common = sorted(set(ullm["part_sec_per_user"]) & set(text["part_sec_per_user"]))
  results["common_part_ratios"] = {  # text seconds / User-LLM seconds per user, same part
      p: text["part_sec_per_user"][p] / ullm["part_sec_per_user"][p]
      for p in common if ullm["part_sec_per_user"][p]}
  results["load_average_end"] = os.getloadavg()
  return results


def _fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> str:
  """The results as a text table (one row per mode) with the ratios and conditions."""
  rows = results["rows"]
  head = (f"{'mode':<12} | {'users':>5} | {'batch':>5} | {'users/s':>7} | {'after 1st':>9} | "
          f"{'s/user':>7} | {'1st batch s':>11} | {'prompt tokens':<28} | part s/user")
  lines = [f"--mode=infer on {results['users']} same users ({results['input']}) of "
           f"{results['workdir']}; median of {results['repeats']} round(s); 'after 1st' "
           "excludes the first (compiling) batch", head, "-" * len(head)]
  for r in rows:
    prompt = ", ".join(f"{t} {n:.0f}" for t, n in (r["mean_prompt_tokens"] or {}).items())
    parts = ", ".join(f"{p} {s:.3f}" for p, s in r["part_sec_per_user"].items())
    lines.append(f"{LABELS[r['mode']]:<12} | {r['users']:>5} | {r['batch_size']:>5} | "
                 f"{_fmt(r['users_per_sec'], '7.2f')} | "
                 f"{_fmt(r['users_per_sec_after_first_batch'], '9.2f')} | "
                 f"{_fmt(r['sec_per_user'], '7.3f')} | "
                 f"{_fmt(r['first_batch_seconds'], '11.1f')} | {prompt:<28} | {parts}")
  lines.append(
      f"ratio User-LLM / text prompt users/s: {_fmt(results['ratio_users_per_sec'], '.2f')} "
      f"(all), {_fmt(results['ratio_users_per_sec_after_first_batch'], '.2f')} (after the "
      "first batch); same part, text / User-LLM seconds per user: "
      + (", ".join(f"{p} {v:.2f}" for p, v in results["common_part_ratios"].items()) or "-"))
  for r in rows:
    lines.append(f"{LABELS[r['mode']]}: tasks {r['tasks']}, <= {r['max_new_tokens']} new "
                 f"tokens; ranking: {r['ranking'] or 'none'}")
  load = lambda xs: "/".join(f"{x:.1f}" for x in xs)
  lines.append(f"load average (1/5/15 min) at start {load(results['load_average_start'])}, "
               f"at end {load(results['load_average_end'])} on {results['cpu_count']} CPUs")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Bars: users/s (all, after the first batch) and seconds per user by part, per mode."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = results["rows"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  names = [LABELS[r["mode"]] for r in rows]
  for i, (key, label) in enumerate((("users_per_sec", "all batches"),
                                    ("users_per_sec_after_first_batch", "after the 1st"))):
    left.bar([x + (i - 0.5) * 0.35 for x in range(len(rows))],
             [r[key] or 0.0 for r in rows], 0.35, label=label)
  left.set_xticks(range(len(rows)), names)
  left.set_ylabel("users / s")
  left.set_title(f"--mode=infer, {results['users']} users")
  left.legend(fontsize=8)
  parts = sorted({p for r in rows for p in r["part_sec_per_user"]})
  bottom = [0.0] * len(rows)
  for part in parts:
    vals = [r["part_sec_per_user"].get(part, 0.0) for r in rows]
    right.bar(range(len(rows)), vals, 0.5, bottom=bottom, label=part)
    bottom = [b + v for b, v in zip(bottom, vals)]
  right.set_xticks(range(len(rows)), names)
  right.set_ylabel("seconds / user")
  right.set_title("time per user by part")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  results = run_benchmark(_WORKDIR.value, split=_SPLIT.value,
                          history_file=_HISTORY_FILE.value, max_users=_MAX_USERS.value,
                          top_k=_TOP_K.value, repeats=_REPEATS.value, out_dir=_OUT_DIR.value)
  print(format_table(results))
  output = _OUTPUT.value or os.path.join(os.path.abspath(_WORKDIR.value),
                                         "infer_throughput.json")
  reporting.write_results(results, output, _PLOT.value, plot)


if __name__ == "__main__":
  define_flags()
  app.run(main)
