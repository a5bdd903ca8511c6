r"""Compare runs evaluated on the same test users, row by row, with paired standard errors.

  python -m experiments.compare_runs --runs=/tmp/ml_user_llm,/tmp/ml_user_llm_random \
      [--names=pretrained,random] [--output=compare.json]
  python -m experiments.compare_runs --runs=/tmp/amazon_user_llm,/tmp/amazon_text \
      --names=user_llm,text --methods=user_llm,text_prompt

Reads each workdir's `summary.json` (`metrics`: {method: {task: metrics}}, as the User-LLM,
text-baseline and main jobs write them) and compares every later run with the first on
every method row and task they share (`eval.paired.compare_runs`): the difference, twice its
standard error (paired over the test users both rows were scored on when both runs kept
per-user values, the independent-samples error otherwise: each line says which) and the
verdict (a difference under two standard errors is a tie). `--methods` names one row per
run instead (a User-LLM run against a text-baseline run: `user_llm` vs `text_prompt`), each
later run's row compared with the first run's. Prints the lines; `--output` also writes
them as JSON. Where a run's rows name groups of test users (a review run's `groups`: the
answer repeats the rating prior's, repeats the user's own phrase, or is new;
`eval/floors.review_groups`), the task's headline metric is also compared within each
group; `--groups_from=WORKDIR` takes the groups from another run on the same test users (a
text-baseline run names none).
"""

import json
import os

from absl import app
from absl import flags

from user_llm_jax.eval import paired

_RUNS = flags.DEFINE_list("runs", None, "Workdirs (the first is the reference).", required=True)
_NAMES = flags.DEFINE_list("names", None, "A name per run (default: the workdirs' basenames).")
_METHODS = flags.DEFINE_list("methods", None, "One method row per run to compare (default: "
                              "every row the runs share).")
_OUTPUT = flags.DEFINE_string("output", "", "Write the comparisons as JSON here.")
_GROUPS_FROM = flags.DEFINE_string(
    "groups_from", "", "A workdir whose summary names groups of test users (a User-LLM run's "
    "review groups); the runs' rows are also compared within each group.")


def load_metrics(workdir: str) -> dict:
  """The `metrics` of `workdir/summary.json`, with a clear error when it is not there."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no summary.json (has the run finished?)")
  with open(path) as f:
    summary = json.load(f)
  metrics = summary.get("metrics")
  if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
    raise ValueError(f"{path}: 'metrics' is not {{method: {{task: metrics}}}} (a User-LLM, "
                     "text-baseline or main job's summary)")
  return metrics


def groups_of(workdir: str) -> dict[str, dict[str, list[int]]]:
  """{task: {group: test ids}} that `workdir`'s summary names.

  Raises:
    ValueError: it names none.
  """
  metrics = load_metrics(workdir)
  groups = {task: paired.task_groups(metrics, task) for task in paired.TASK_KEYS}
  groups = {task: g for task, g in groups.items() if g}
  if not groups:
    raise ValueError(f"{workdir}/summary.json: no row names groups of test users (a "
                     "User-LLM review run written with today's code does)")
  return groups


def main(argv):
  del argv
  runs = _RUNS.value
  names = _NAMES.value or [os.path.basename(os.path.normpath(r)) for r in runs]
  if len(names) != len(runs) or len(runs) < 2:
    raise app.UsageError(f"need >= 2 runs and one name per run; got {len(runs)} runs, "
                         f"{len(names)} names")
  methods = _METHODS.value
  if methods is not None and len(methods) != len(runs):
    raise app.UsageError(f"--methods needs one method row per run; got {len(methods)} for "
                         f"{len(runs)} runs")
  reference = (names[0], load_metrics(runs[0]))
  groups = groups_of(_GROUPS_FROM.value) if _GROUPS_FROM.value else None
  results = []
  for i, (name, run) in enumerate(zip(names[1:], runs[1:]), start=1):
    pair = (methods[0], methods[i]) if methods else None
    results.extend(paired.compare_runs(reference, (name, load_metrics(run)), pair,
                                       groups=groups))
  print("\n".join(r["text"] for r in results) or "no method row and task in common")
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
