r"""User-LLM study: ablation arms on the embedded synthetic data, each figure with n and SE.

  python -m experiments.benchmarks.user_llm_study --output=runs/study/study.json \
      [--variant=cpu|smoke] [--only=user_llm,text_lora,...] [--steps=N]

The arms are `experiments/configs/user_llm_study.py:ARMS`, each a set of config overrides
over the main config (experiments/configs/main.py: the same synthetic data, encoder
pretraining and defaults):

  user_llm        cross-attention, Enc, pretrained encoder, 50 events (the reference)
  text_lora       the same LLM reading the history as text, LoRA, the same step budget
  random_encoder  encoder not pretrained          soft_prompt   soft prompt bridge
  perceiver       Perceiver, 16 latents           strategy_*    Enc / LoRA / Full / Proj
  history_*       50 / 200 / 500 events per user history (own data + encoder pretraining)
  text_lora_500   the text prompt on the 500-event data (compared with history_500)
  pooled_500      history_500 with the mean of the encoder's states as one more context
                  embedding (`bridge.pooled_context`; compared with both)
  standardized_500  history_500 with the encoder's states standardised by their training
                  statistics before the bridge (`bridge.standardize_states`; with both)
  fav_only_500    history_500 trained on the favorite genre alone, as text_lora_500 is (the
                  User-LLM arms otherwise split their examples with the next item)
  fav_only / soft_prompt_fav_only   the same on 50 events, cross-attention / soft prompt
  soft_prompt_fav_only_lr10 / _lr30 / soft_prompt_lora_fav_only_lr10   the soft prompt's
                  bridge at 10x / 30x the base rate, and at 10x with LoRA on the LLM

Layout of the output directory (DIR = the directory of --output):

  DIR/data/<data group>/{raw,data,encoder}  synthetic data, its preparation and the encoder
                                            pretraining, shared by the arms with that data
  DIR/<arm>/                                the arm's run (job `train_user_llm` or
                                            `text_baseline`, through `jobs.resolve`)
  DIR/study.json, study.md, study.png       the report, its table, the learning curves

Rerunning the same command reuses every finished arm (its `summary.json` exists; a finished
arm whose config changed is an error naming the keys) and resumes an interrupted one from
its checkpoint. Arms with identical configs run once (`strategy_enc` and `history_50` are
`user_llm`).

The table: per arm, trained / total parameters, favorite-genre accuracy +- standard error
and n (test users), the exact count of its view (the label's rule applied to the events the
arm reads: the encoder's window, or what the text prompt shows; a reference from above,
not a floor), the accuracy of a linear probe of its pretrained encoder's mean-pooled states
(`eval/probe.py`: whether the states still carry the answer), the item head's Recall@10 +-
SE and n (User-LLM arms), the accuracy of the shuffled-context control (each user's context
swapped for another user's), training seconds (job start to end of training) and
evaluation seconds per answer. Verdicts compare each arm with `user_llm`, with its own
shuffled control, count and probe, and `user_llm` with the floors; a difference under two
standard errors of the difference is a tie. The arms are scored on
the same seeded test users, so the standard error of a difference is the paired one (of the
per-user differences, `eval.paired`); runs that kept no per-user values (written before
they were recorded) fall back to sqrt(SE_a^2 + SE_b^2), the independent-samples error,
which overstates it. Each verdict says which it used.

Cost of `--variant=cpu` (all 12 arms, 10 runs), an estimate for a 2-core CPU at about 2 s
per SmolLM2 User-LLM step (Enc, batch 8), not a measurement: 3 data preparations and encoder
pretrainings (300 steps each, window 50 / 200 / 500) ~12 min; 100 training steps per arm,
~19 Enc-step equivalents over the 10 runs (LoRA / Full / soft prompt ~2-2.5x an Enc step, as
their gradients cross every LLM layer; the text prompt ~6x on ~290-token prompts) ~65 min;
learning-curve points (every 25 steps, 40 test users) ~5 min; final evaluation on 100 test
users per task with the shuffled control ~15 min; loading and compiling ~8 min: about 1 h 45
min to 2 h in total. `--variant=smoke` (tiny random LLM, 3 arms) takes about a minute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments.configs import user_llm_study as study_config
from user_llm_jax import config as config_lib
from user_llm_jax import jobs
from user_llm_jax import runs
from user_llm_jax import sharding
from user_llm_jax.data import prepared
from user_llm_jax.eval import paired
# The pipeline's stage configs: every arm reads its data, and User-LLM arms its encoder.
from user_llm_jax.jobs import main_pipeline
from user_llm_jax.train import summary as summary_lib

DATA = "data"   # DIR/data/<group>/: data and encoder shared by the arms with that data
USER_LLM_JOB, TEXT_JOB = "train_user_llm", "text_baseline"
# The job's method key in its summary's metrics, and the pipeline stage it is.
METHOD = {USER_LLM_JOB: "user_llm", TEXT_JOB: "text_prompt"}
STAGE = {USER_LLM_JOB: "user_llm", TEXT_JOB: "text_baseline"}
FAV, NEXT = "favorite_category", "next_item"
# Report figures: name -> (method key suffix, task, metric), the method being the arm's.
FIGURES = {
    "fav_acc": ("", FAV, "accuracy"),
    "item_head_recall@10": ("_item_head", NEXT, "recall@10"),
    "shuffled_fav_acc": ("_shuffled", FAV, "accuracy"),
    "shuffled_item_head_recall@10": ("_item_head_shuffled", NEXT, "recall@10"),
}
# The exact count of the events an arm reads (`eval/floors.py`), the favorite-category
# label's rule applied to its view: what counting them answers. Read from the arm's run.
COUNT = {USER_LLM_JOB: "count_window", TEXT_JOB: "count_prompt"}
# Floors read from the reference arm's run: name -> (method, task, metric, label).
FLOORS = {
    "majority": ("majority", FAV, "accuracy", "majority genre (floor)"),
    "popularity": ("popularity", NEXT, "recall@10", "popularity (floor)"),
    "sasrec": ("sasrec", NEXT, "recall@10", "SASRec-style encoder (pretrained)"),
}


class StudyConfigChanged(config_lib.ConfigError):
  """A finished run in the output directory was made with a different config."""


@dataclasses.dataclass(frozen=True)
class ArmRun:
  """An arm resolved to what runs.

  Attributes:
    name: the arm's name (a key of `ARMS`).
    label: what the arm is.
    job: `train_user_llm` or `text_baseline`.
    config: the job's config.
    workdir: the run's directory (the first identical arm's, when `same_as` is set).
    data: the data section before the stage paths (prepared into `data_root`).
    data_root: DIR/data/<group>.
    encoder: the encoder pretraining stage's config, or None when the arm needs none.
    same_as: the arm whose run this is, when the configs are identical.
  """

  name: str
  label: str
  job: str
  config: ml_collections.ConfigDict
  workdir: str
  data: ml_collections.ConfigDict
  data_root: str
  encoder: ml_collections.ConfigDict | None
  same_as: str | None = None


# ------------------------------------------------------------------------------ the arms


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    arm: str) -> None:
  """Sets the dotted keys `overrides` in `config` (in place).

  Raises:
    ConfigError: a key the config does not have, or a value of the wrong type (names the
      arm and the key).
  """
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts[:-1]):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise config_lib.ConfigError(
            f"arm {arm!r}: override {key!r}: the config has no section "
            f"{'.'.join(parts[:depth + 1])!r}")
      node = node[part]
    if parts[-1] not in node:
      raise config_lib.ConfigError(
          f"arm {arm!r}: unknown config key {key!r}; valid keys of "
          f"{'.'.join(parts[:-1]) or 'the top level'}: {', '.join(sorted(node.keys()))}")
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f"arm {arm!r}: override {key}={value!r}: {e}") from e


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_leaves(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def data_group(base: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> str:
  """A directory name for a data section: 'default', or its keys that differ from `base`."""
  old, new = _leaves(config_lib.to_plain(base)), _leaves(config_lib.to_plain(data))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if not changed:
    return "default"
  return "_".join(f"{k.rsplit('.', 1)[-1]}{new.get(k)}" for k in changed).replace("/", "-")


def _identity(config: ml_collections.ConfigDict) -> str:
  """What makes two arms the same run: the whole config but its name."""
  plain = config_lib.to_plain(config)
  plain.pop("name", None)
  return json.dumps(plain, sort_keys=True, default=str)


def resolve_arms(variant: str, names: Sequence[str], out_dir: str,
                 steps: int | None = None) -> list[ArmRun]:
  """The arms `names` of the study's `variant`, resolved to jobs, configs and directories.

  Each arm's overrides go over the variant's config; the main pipeline's stage configs
  then point it at its data group's prepared data (and encoder pretraining), and the
  overrides are applied again on the stage config (which sets e.g. `encoder.init`).
  Arms with identical configs share one run: the first of them already finished, else
  the first named. `steps` (default: the variant's) sets every arm's LLM training steps,
  the same budget for all; the encoder pretraining keeps its own.

  Raises:
    ConfigError: an unknown arm, an arm whose overrides do not fit the config, or steps < 1.
  """
  unknown = [n for n in names if n not in study_config.ARMS]
  if unknown or not names:
    raise config_lib.ConfigError(f"unknown study arms {unknown or list(names)}; known: "
                                 f"{', '.join(study_config.ARMS)}")
  base = study_config.get_config(variant)
  if steps is not None:
    if steps < 1:
      raise config_lib.ConfigError(f"study steps must be >= 1, got {steps}")
    base.train.num_steps = steps
  out_dir = os.path.abspath(out_dir)
  resolved = []
  for name in dict.fromkeys(names):
    if name == DATA:
      raise config_lib.ConfigError(f"arm name {name!r} is the shared data directory's")
    arm = study_config.ARMS[name]
    config = ml_collections.ConfigDict(base.to_dict())
    apply_overrides(config, arm.overrides, name)
    job = config.job if "job" in arm.overrides else USER_LLM_JOB
    if job not in STAGE:
      raise config_lib.ConfigError(f"arm {name!r}: job {job!r}; study arms run one of "
                                   f"{sorted(STAGE)}")
    data_root = os.path.join(out_dir, DATA, data_group(base.data, config.data))
    stages = main_pipeline.stage_configs(config, data_root)
    run_config = stages[STAGE[job]]
    apply_overrides(run_config, arm.overrides, name)
    run_config.name = f"{base.name}/{name}"
    pretrained = job == USER_LLM_JOB and run_config.encoder.init == "pretrained"
    resolved.append(ArmRun(name=name, label=arm.label, job=job, config=run_config,
                           workdir=os.path.join(out_dir, name), data=config.data,
                           data_root=data_root,
                           encoder=stages["encoder"] if pretrained else None))
  groups: dict[str, list[ArmRun]] = {}
  for arm in resolved:
    groups.setdefault(_identity(arm.config), []).append(arm)
  out = []
  for arm in resolved:
    group = groups[_identity(arm.config)]
    first = next((a for a in group if _finished(a.workdir)), group[0])
    if first is not arm:
      arm = dataclasses.replace(arm, workdir=first.workdir, same_as=first.name)
    out.append(arm)
  return out


# ------------------------------------------------------------------------------- running


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, summary_lib.SUMMARY_JSON))


def run_or_reuse(config: ml_collections.ConfigDict, workdir: str,
                 what: str) -> tuple[dict[str, Any], bool]:
  """(summary, reused): the finished run in `workdir`, else `config.job` run there.

  Raises:
    StudyConfigChanged: `workdir` holds a finished run of a different config.
    SystemExit: the job was preempted (rerunning resumes it).
  """
  summary_path = os.path.join(workdir, summary_lib.SUMMARY_JSON)
  if os.path.exists(summary_path):
    run_path = os.path.join(workdir, runs.RUN_JSON)
    if os.path.exists(run_path):
      with open(run_path, encoding="utf-8") as f:
        saved = ml_collections.ConfigDict(json.load(f)["config"])
      old = json.loads(json.dumps(config_lib.fingerprint(saved), default=str))
      new = json.loads(json.dumps(config_lib.fingerprint(config), default=str))
      if old != new:
        keys = config_lib.differing_keys(old, new)
        raise StudyConfigChanged(
            f"{what} in {workdir} finished with a different config ({', '.join(keys[:5])}); "
            "use a fresh output directory, or delete that directory to rerun it")
    with open(summary_path, encoding="utf-8") as f:
      return json.load(f), True
  os.makedirs(workdir, exist_ok=True)
  with sharding.axis_rules(tuple(config.mesh.rules)):
    out = jobs.resolve(config.job)(config, workdir)
  if out.get("preempted"):
    raise SystemExit(f"{what} preempted at step {out['step']}; rerun to resume")
  return out, False


# ------------------------------------------------------------------------------ the report


def figure(metrics: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
  """{'value', 'stderr', 'n'} of one metric (and its per-example values, for paired
  verdicts, when the run kept them), or None when absent."""
  if not metrics or metrics.get(key) is None:
    return None
  stderr = metrics.get(f"{key}_stderr")
  out = {"value": float(metrics[key]),
         "stderr": float(stderr) if stderr is not None else float("nan"),
         "n": int(metrics.get("num_examples", 0))}
  per = metrics.get(paired.PER_EXAMPLE)
  if per and key in per.get("values", {}):
    out["per_example"] = {"ids": per["ids"], "values": {"value": per["values"][key]}}
  return out


def _metrics(fig: Mapping[str, Any]) -> dict[str, Any]:
  """A `figure` as the metric dict `paired.difference` reads (metric name 'value')."""
  out = {"value": fig["value"], "value_stderr": fig["stderr"], "num_examples": fig["n"]}
  if fig.get("per_example"):
    out[paired.PER_EXAMPLE] = fig["per_example"]
  return out


def arm_entry(arm: ArmRun, summary: Mapping[str, Any], reused: bool) -> dict[str, Any]:
  """The arm's figures for the report, read from its run's summary."""
  metrics = summary["metrics"]
  method = METHOD[arm.job]
  entry: dict[str, Any] = {
      "label": arm.label, "job": arm.job, "run_dir": arm.workdir, "same_as": arm.same_as,
      "reused": reused,
      "overrides": config_lib.to_plain(dict(study_config.ARMS[arm.name].overrides)),
      "trainable_params": int(summary["trainable_params"]),
      "total_params": int(summary["total_params"]),
      "steps": int(summary["steps"]), "batch_size": int(summary["budget"]["batch_size"]),
      "train_sec": float(summary["budget"]["train_sec"]),
      "eval_sec": float(summary["budget"]["eval_sec"]),
      "window": int(arm.config.data.window),
      "events_per_user_mean": float(arm.config.data.synthetic.events_per_user_mean),
  }
  for name, (suffix, task, key) in FIGURES.items():
    entry[name] = figure(metrics.get(method + suffix, {}).get(task), key)
  entry["count_fav_acc"] = figure(metrics.get(COUNT[arm.job], {}).get(FAV), "accuracy")
  entry["probe_fav_acc"] = figure(metrics.get("probe", {}).get(FAV), "accuracy")
  secs = [m["sec_per_answer"] for m in metrics.get(method, {}).values()
          if "sec_per_answer" in m]
  entry["sec_per_answer"] = float(np.mean(secs)) if secs else None
  entry["curve"] = list(summary.get("curve") or [])
  test_records = summary.get("dataset", {}).get("test_records")
  entry["curve_examples"] = (min(int(arm.config.eval.curve_examples), int(test_records))
                             if test_records else int(arm.config.eval.curve_examples))
  entry["floors"] = {name: figure(metrics.get(m, {}).get(task), key)
                     for name, (m, task, key, _) in FLOORS.items()
                     if metrics.get(m, {}).get(task)}
  return entry


def compare(metric: str, a: str, fa: Mapping[str, float], b: str,
            fb: Mapping[str, float]) -> dict[str, Any]:
  """One verdict: `a` ahead of, behind or tied with `b` (under 2 SE of the difference;
  paired over the shared test users when both figures carry per-example values)."""
  diff = paired.difference(_metrics(fa), _metrics(fb), "value")
  word = {"ahead": "ahead of", "behind": "BEHIND",
          "tie": "tied with (difference under 2 standard errors)"}[diff.verdict]
  return {"metric": metric, "a": a, "b": b, "a_value": fa["value"], "b_value": fb["value"],
          "diff": diff.diff, "two_se": 2 * diff.se, "paired": diff.paired, "n": diff.n,
          "verdict": diff.verdict,
          "text": (f"{metric}: {a} {fa['value']:.3f} (n={fa['n']}) is {word} {b} "
                   f"{fb['value']:.3f} (n={fb['n']}) ({diff.describe()})")}


def verdicts(arms: Mapping[str, Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
  """Each arm vs the reference, each run vs its shuffled control, the reference vs floors."""
  out = []
  ref = arms[reference]
  ref_run = ref["same_as"] or reference
  for name, entry in arms.items():
    if name == reference or (entry["same_as"] or name) == ref_run:
      continue
    for metric in ("fav_acc", "item_head_recall@10"):
      if entry[metric] and ref[metric]:
        out.append(compare(metric, name, entry[metric], reference, ref[metric]))
  for name, entry in arms.items():
    if entry["same_as"]:
      continue
    for metric in ("fav_acc", "item_head_recall@10"):
      control = entry.get(f"shuffled_{metric}")
      if entry[metric] and control:
        out.append(compare(metric, name, entry[metric], f"{name} shuffled users (control)",
                           control))
  for name, entry in arms.items():
    for key, what in (("count_fav_acc", "exact count of the events it reads"),
                      ("probe_fav_acc", "linear probe of its encoder's states")):
      if not entry["same_as"] and entry["fav_acc"] and entry.get(key):
        out.append(compare("fav_acc", name, entry["fav_acc"], f"{name}: {what}", entry[key]))
  floor_metric = {"majority": "fav_acc", "popularity": "item_head_recall@10",
                  "sasrec": "item_head_recall@10"}
  for floor, fig in ref.get("floors", {}).items():
    mine = ref[floor_metric[floor]]
    if mine and fig:
      out.append(compare(floor_metric[floor], reference, mine, FLOORS[floor][3], fig))
  # Arms on other data (history lengths) have floors of their own, and are compared with
  # the text prompt on the same data: the reference's floors do not apply to them.
  for name, other in study_config.SAME_DATA_PAIRS:
    if name in arms and other in arms and arms[name]["fav_acc"] and arms[other]["fav_acc"]:
      out.append(compare("fav_acc", name, arms[name]["fav_acc"], other,
                         arms[other]["fav_acc"]))
  for name, entry in arms.items():
    if name == reference or entry["same_as"] or entry.get("window") == ref.get("window"):
      continue
    fig = entry.get("floors", {}).get("majority")
    if entry["fav_acc"] and fig:
      out.append(compare("fav_acc", name, entry["fav_acc"],
                         f"{name} data: {FLOORS['majority'][3]}", fig))
  return out


def _cell(fig: Mapping[str, float] | None) -> str:
  if not fig:
    return "-"
  return f"{fig['value']:.3f} +- {fig['stderr']:.3f}"


def _n(fig: Mapping[str, float] | None) -> str:
  return str(fig["n"]) if fig else "-"


def table(report: Mapping[str, Any]) -> str:
  """One row per arm (and the floors of the reference run): figures +- SE, n, seconds."""
  header = ["arm", "trained / total params", "fav_acc", "n", "count of its view", "n",
            "probe of its states", "n", "item-head R@10", "n", "shuffled fav_acc", "n",
            "steps", "train s", "s/answer"]
  rows = []
  for name, e in report["arms"].items():
    rows.append([
        name + (f" (= {e['same_as']})" if e["same_as"] else ""),
        f"{e['trainable_params'] / 1e6:.2f} M / {e['total_params'] / 1e6:.1f} M",
        _cell(e["fav_acc"]), _n(e["fav_acc"]), _cell(e.get("count_fav_acc")),
        _n(e.get("count_fav_acc")), _cell(e.get("probe_fav_acc")),
        _n(e.get("probe_fav_acc")), _cell(e["item_head_recall@10"]),
        _n(e["item_head_recall@10"]), _cell(e["shuffled_fav_acc"]), _n(e["shuffled_fav_acc"]),
        f"{e['steps']} x {e['batch_size']}", f"{e['train_sec']:.0f}",
        f"{e['sec_per_answer']:.3f}" if e["sec_per_answer"] is not None else "-"])
  ref = report["arms"].get(report["reference"], {})
  for floor, fig in ref.get("floors", {}).items():
    fav = fig if FLOORS[floor][1] == FAV else None
    item = fig if FLOORS[floor][1] == NEXT else None
    rows.append([FLOORS[floor][3], "-", _cell(fav), _n(fav), "-", "-", "-", "-", _cell(item),
                 _n(item), "-", "-", "-", "-", "-"])
  return summary_lib.format_table(rows, header)


def report_text(report: Mapping[str, Any]) -> str:
  """The table, what its columns mean, and the verdicts."""
  lines = [
      f"User-LLM study ({report['variant']}, {report['steps']} training steps per "
      f"arm): {len(report['arms'])} arms; value +- standard "
      "error; n = test users the figure rests on; shuffled = each user's context swapped "
      "for another user's (control); train s = job start to end of training; s/answer = "
      "evaluation seconds per answer on this machine",
      table(report),
      "verdicts (a difference under two standard errors is a tie):"]
  lines += [f"  {v['text']}" for v in report["verdicts"]]
  return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
  """Learning curves of the trained arms (User-LLM and the text prompt): favorite-genre
  accuracy and item-head Recall@10 against training steps (bars: binomial standard error on the curve's test users)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  keys = (("fav_acc", "favorite-genre accuracy"), ("item_head_recall@10", "item head Recall@10"))
  tops = [0.1, 0.1]   # y-axis tops: proportions, at least 0.1 so a flat 0 stays readable
  users = set()
  for index, (name, e) in enumerate(report["arms"].items()):
    if e["same_as"] or not e["curve"]:
      continue
    color = f"C{index % 10}"   # one colour per arm in both panels
    n = max(e["curve_examples"], 1)
    users.add(n)
    for i, (ax, (key, _)) in enumerate(zip(axes, keys)):
      pts = [(c["step"], c[key]) for c in e["curve"] if key in c]
      if pts:
        steps, values = (np.asarray(v, float) for v in zip(*pts))
        err = np.sqrt(values * (1 - values) / n)
        ax.errorbar(steps, values, yerr=err, marker="o", capsize=2, label=name, color=color)
        tops[i] = max(tops[i], float(np.max(values + err)))
  without = [n for n, e in report["arms"].items() if not e["curve"] and not e["same_as"]]
  for ax, (_, title), top in zip(axes, keys, tops):
    top = min(1.0, 1.1 * top)
    ax.set_ylim(-0.03 * top, top)   # a little below 0 so points at 0 stay visible
    ax.set_xlabel("training step")
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  note = f"; no curve: {', '.join(without)}" if without else ""
  seeded = "/".join(str(n) for n in sorted(users)) or "no"
  fig.suptitle(f"User-LLM study ({report['variant']}): learning curves on {seeded} seeded "
               f"test users (bars: binomial SE){note}", fontsize=9)
  fig.tight_layout()
  tmp = f"{path}.tmp.{os.getpid()}.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def _write_json(path: str, report: Mapping[str, Any]) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, path)


def run_study(variant: str, output: str, only: Sequence[str] | None = None,
              steps: int | None = None) -> dict[str, Any]:
  """Runs (or reuses) the arms and writes `output` (JSON), `.md` (table) and `.png` (curves).

  Args:
    variant: 'cpu' or 'smoke' (`experiments/configs/user_llm_study.py`).
    output: the report's path; its directory holds the arms' and the data's directories.
    only: the arms to run (default: the variant's arms).
    steps: LLM training steps of every arm (default: the variant's; a finished arm of
      another budget in the same directory is an error, so use a fresh output).

  Returns:
    The report (also written to `output` after each arm, with `complete` False until the
    last one).
  """
  start = time.perf_counter()
  output = os.path.abspath(output)
  out_dir = os.path.dirname(output)
  names = list(only) if only else list(study_config.VARIANT_ARMS[variant])
  arms = resolve_arms(variant, names, out_dir, steps)
  reference = (study_config.REFERENCE if study_config.REFERENCE in names else arms[0].name)
  os.makedirs(out_dir, exist_ok=True)
  report: dict[str, Any] = {"variant": variant, "output_dir": out_dir,
                            "steps": arms[0].config.train.num_steps,
                            "reference": reference, "arms": {}, "verdicts": [],
                            "complete": False}
  prepared_roots, summaries = set(), {}
  for arm in arms:
    if arm.data_root not in prepared_roots and not (arm.same_as or _finished(arm.workdir)):
      # Generates the synthetic data into DATA_ROOT/raw and prepares it (reused if done).
      prepared.prepare(arm.data, arm.data_root)
      prepared_roots.add(arm.data_root)
    if arm.workdir not in summaries:
      if arm.encoder is not None and not _finished(arm.workdir):
        run_or_reuse(arm.encoder, os.path.join(arm.data_root, "encoder"),
                     f"encoder pretraining of {arm.data_root}")
      print(f"[study] arm {arm.name} -> {arm.workdir}", flush=True)
      summaries[arm.workdir] = run_or_reuse(arm.config, arm.workdir, f"arm {arm.name}")
    summary, reused = summaries[arm.workdir]
    report["arms"][arm.name] = arm_entry(arm, summary, reused or arm.same_as is not None)
    _write_json(output, report)
  report["verdicts"] = verdicts(report["arms"], reference)
  report["table"] = table(report)
  report["complete"] = True
  report["wall_seconds"] = time.perf_counter() - start
  stem = os.path.splitext(output)[0]
  report["plot"] = stem + ".png"
  plot(report, report["plot"])
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(report_text(report) + "\n")
  _write_json(output, report)
  return report


def define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that importing this
  module (tests) never clashes with other modules' flags."""
  flags.DEFINE_string("output", "/tmp/user_llm_study/study.json",
                      "Report JSON (.md/.png beside); its directory holds the runs.")
  flags.DEFINE_enum("variant", "cpu", sorted(study_config.VARIANT_ARMS),
                    "cpu: SmolLM2, every arm (about 2 h on 2 cores); smoke: tiny, 3 arms.")
  flags.DEFINE_list("only", [], f"Arms to run (default: the variant's): "
                    f"{', '.join(study_config.ARMS)}.")
  flags.DEFINE_integer("steps", None, "LLM training steps of every arm (default: the "
                       "variant's, user_llm_study.STEPS for cpu); the same for all arms.")


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:  # reruns skip most compilation
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "user_llm_jax_xla")))
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every save at INFO
  try:
    report = run_study(FLAGS.variant, FLAGS.output, FLAGS.only or None,
                       FLAGS.steps)
  except config_lib.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  print(report_text(report), flush=True)
  print(f"wrote {FLAGS.output} (+ .md, .png) in {report['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
