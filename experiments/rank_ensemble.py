r"""Rank the test split with an ensemble of trained encoder runs, beside each member.

  python -m experiments.rank_ensemble \
      --runs=runs/eq_s0/ml-latest-small/ARM,runs/eq_s1/ml-latest-small/ARM,... \
      [--names=seed0,seed1,...] --output_dir=runs/ensemble

The runs are encoder pretraining workdirs on the same prepared data (e.g. one arm of
`experiments.benchmarks.encoder_quality` at several seeds, `--overrides='{"seed": N}'`,
each in its own `--output`). Each is restored at its best validation step, and the ensemble
ranks by the mean of the members' next-item log-probabilities (`eval/ensemble.py`). Prints
and writes (`ensemble.json`, `ensemble.md`, `ensemble.png`): test Recall@1/5/10 and
NDCG@10 of every member and of the ensemble with their standard errors and the number of
test users, validation Recall@10 / NDCG@10, popularity on the same split, the ensemble's
difference from each member (paired over the test users), and, on k-core leave-one-out
splits, the ensemble's context check (`eval.ranking.context_check`: with the first-order
counts added, weight chosen on validation; the input-window control).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags

from user_llm_jax import storage
from user_llm_jax.eval import ensemble as ensemble_lib
from user_llm_jax.eval import paired
from user_llm_jax.eval import popularity
from user_llm_jax.eval import ranking
from user_llm_jax.eval import retrieval

# Not `required=True`: that registers a validator on the process's global flags, which
# fails every other absl program that imports this module (the tests do).
_RUNS = flags.DEFINE_list("runs", None, "Encoder run workdirs (two or more).")
_NAMES = flags.DEFINE_list("names", None, "A name per run (default: run1, run2, ...).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the report.")

ENSEMBLE = "ensemble"
KS = (1, 5, 10)
COLUMNS = ("recall@1", "recall@5", "recall@10", "ndcg@10")


def evaluate(workdirs: Sequence[str], names: Sequence[str] | None = None,
             ) -> dict[str, Any]:
  """The report of the ensemble of `workdirs` (see the module docstring)."""
  names = list(names or [f"run{i + 1}" for i in range(len(workdirs))])
  if len(names) != len(workdirs) or len(set(names)) != len(names) or ENSEMBLE in names:
    raise ValueError(f"--names: one distinct name per run, not {ENSEMBLE!r}; got {names} "
                     f"for {len(workdirs)} runs")
  start = time.perf_counter()
  model, members = ensemble_lib.load_runs(workdirs)
  config = ensemble_lib.config_of(members)
  data = ranking.RankingData.load(config, members[0].workdir)
  models = {**dict(zip(names, model.members)), ENSEMBLE: model}
  test_ids = range(len(data.test))
  rows, test_full, validation_full = {}, {}, {}
  for name, m in models.items():
    test = retrieval.evaluate_next_item(m, data.eval_batches(config, data.test), ks=KS,
                                        ids=test_ids)
    test_full[name] = test
    row = {k: v for k, v in test.items() if k != paired.PER_EXAMPLE}
    if data.splits.validation is not None:
      # Per-user values kept, as for test: the context check below reads the ensemble's
      # instead of ranking the split again.
      val = retrieval.evaluate_next_item(
          m, data.eval_batches(config, data.splits.validation), ks=KS,
          ids=range(len(data.splits.validation)))
      validation_full[name] = val
      row.update({f"val/{k}": val[k] for k in ("recall@10", "ndcg@10")})
    rows[name] = row
  versus = {name: ranking.paired_differences(test_full[ENSEMBLE], test_full[name])
            for name in names}
  counts = popularity.fit_item_counts(data.train, data.vocab.num_items)
  pop = popularity.evaluate_popularity(counts, data.eval_batches(config, data.test), ks=KS)
  report = {
      "runs": dict(zip(names, (m.workdir for m in members))),
      "protocol": ranking.protocol(config), "num_test_users": len(data.test),
      "rows": rows, "popularity": pop, "ensemble_vs_member": versus,
      "per_example": {n: test_full[n][paired.PER_EXAMPLE] for n in models},
  }
  if ranking.context_check_applies(config) and data.splits.validation is not None:
    report["context_check"] = ranking.context_check(
        model, config, data, ks=KS, test_metrics=test_full[ENSEMBLE],
        validation_metrics=validation_full[ENSEMBLE])
  report["wall_time_sec"] = time.perf_counter() - start
  return report


def _fig(row: Mapping[str, Any], key: str) -> str:
  se = row.get(f"{key}_stderr")
  return f"{row[key]:.4f}" + (f" +- {se:.4f}" if se is not None else "")


def table(report: Mapping[str, Any]) -> str:
  """The report as Markdown: one row per member, the ensemble, popularity; then verdicts."""
  n = report["num_test_users"]
  head = "| model | n | " + " | ".join(c.replace("recall", "R").replace("ndcg", "NDCG")
                                       for c in COLUMNS) + " | val R@10 | val NDCG@10 |"
  lines = [f"Protocol: {report['protocol']['seen']}, split {report['protocol']['split']}, "
           f"timestamps {report['protocol']['timestamps']}; +- one standard error.", "",
           head, "|" + "---|" * (len(COLUMNS) + 4)]
  for name, row in report["rows"].items():
    val = " | ".join(f"{row[k]:.4f}" if k in row else "-"
                     for k in ("val/recall@10", "val/ndcg@10"))
    label = f"**{name}**" if name == ENSEMBLE else name
    lines.append(f"| {label} | {n} | " + " | ".join(_fig(row, c) for c in COLUMNS)
                 + f" | {val} |")
  pop = report["popularity"]
  lines.append(f"| popularity | {n} | " + " | ".join(_fig(pop, c) for c in COLUMNS)
               + " | - | - |")
  lines += ["", "Ensemble minus each member, paired over the test users:"]
  for name, diffs in report["ensemble_vs_member"].items():
    verdicts = ", ".join(f"{key} {paired.Difference(**d).verdict}"
                         for key, d in diffs.items())
    lines.append(f"- {name}: {ranking.differences_text(diffs)} ({verdicts})")
  check = report.get("context_check")
  if check:
    lines += ["", ranking.context_check_text(check)]
  lines.append(f"\nwall time {report['wall_time_sec']:.0f} s")
  return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
  """Test Recall@10 and NDCG@10 of every member and the ensemble, with +- 1 SE bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report["rows"])
  fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names), 3.5))
  for ax, key in zip(axes, ("recall@10", "ndcg@10")):
    rows = [report["rows"][n] for n in names]
    ax.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_stderr"] for r in rows],
           color=["tab:orange" if n == ENSEMBLE else "tab:blue" for n in names], capsize=3)
    ax.axhline(report["popularity"][key], color="gray", ls="--", label="popularity")
    ax.set_title(f"test {key} (n = {report['num_test_users']})")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(report: Mapping[str, Any], output_dir: str) -> str:
  """Writes ensemble.json / .md / .png into `output_dir`; returns the Markdown."""
  storage.makedirs(output_dir)
  text = table(report)
  storage.write_atomic(os.path.join(output_dir, "ensemble.json"),
                       json.dumps(report, indent=1, default=float))
  storage.write_atomic(os.path.join(output_dir, "ensemble.md"), text + "\n")
  plot(report, os.path.join(output_dir, "ensemble.png"))
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _RUNS.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--runs (encoder run workdirs) and --output_dir are required")
  report = evaluate(_RUNS.value, _NAMES.value)
  print(write(report, _OUTPUT_DIR.value))


if __name__ == "__main__":
  app.run(main)
