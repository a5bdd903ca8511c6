"""Differences between two methods measured on the same test examples.

Every comparison in the reports is between methods evaluated on the same seeded test
users. The standard error of the difference of two means over the same examples is the
standard error of the mean per-example difference (a paired comparison). Treating the two
as independent samples, sqrt(se_a^2 + se_b^2), overstates it whenever the methods agree on
many examples (two models of one encoder mostly right and wrong on the same users), and
so calls real differences ties.

A metric dict carries its per-example values as

  per_example = {"ids": [test record index, ...], "values": {metric: [value, ...]}}

(`per_example(...)` builds it). `difference` of two metric dicts that both carry the
metric's values is paired over the ids they share; otherwise it falls back to the
unpaired error, and says which (`Difference.paired`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PER_EXAMPLE = "per_example"
# A metric dict may name groups of its test ids ({group: [id, ...]}, e.g. the review
# groups of `eval/floors.review_groups`): every row of that task is then broken down by
# them (`group_breakdown`, and `compare_runs` per group).
GROUPS = "groups"


def per_example(ids: Sequence[int], values: Mapping[str, Sequence[float]],
                *, digits: int = 6) -> dict[str, Any]:
  """The `per_example` entry of a metric dict (values rounded to `digits` for the JSON).

  Raises:
    ValueError: a metric whose number of values differs from the number of ids, or an id
      given twice.
  """
  ids = [int(i) for i in ids]
  if len(set(ids)) != len(ids):
    raise ValueError(f"per_example ids must be distinct; got {len(ids)} ids, "
                     f"{len(set(ids))} distinct")
  out: dict[str, list[float]] = {}
  for key, vals in values.items():
    vals = np.asarray(vals, np.float64).reshape(-1)
    if vals.size != len(ids):
      raise ValueError(f"per_example metric {key!r} has {vals.size} values for "
                       f"{len(ids)} ids")
    out[key] = [round(float(v), digits) for v in vals]
  return {"ids": ids, "values": out}


@dataclasses.dataclass(frozen=True)
class Difference:
  """`a - b` of one metric with its standard error.

  Attributes:
    diff: the difference of the means (over the shared examples when paired).
    se: its standard error (nan when it cannot be computed).
    n: examples it is computed on (paired: shared ids; unpaired: the smaller n).
    paired: whether `se` is the paired one.
  """
  diff: float
  se: float
  n: int
  paired: bool

  @property
  def verdict(self) -> str:
    """'ahead', 'behind' or 'tie' (a difference under two standard errors; a standard
    error of 0 or nan cannot tell, and is called a tie too)."""
    if math.isfinite(self.se) and self.se > 0 and abs(self.diff) > 2 * self.se:
      return "ahead" if self.diff > 0 else "behind"
    return "tie"

  def describe(self) -> str:
    """'difference +0.080, 2 SE = 0.050, paired, n = 200'."""
    kind = "paired" if self.paired else "unpaired"
    return f"difference {self.diff:+.3f}, 2 SE = {2 * self.se:.3f}, {kind}, n = {self.n}"


def example_values(metrics: Mapping[str, Any], key: str) -> dict[int, float] | None:
  """`{example id: value}` of `key` from a metric dict's per-example entry (None without)."""
  entry = metrics.get(PER_EXAMPLE)
  if not entry or key not in entry.get("values", {}):
    return None
  return dict(zip((int(i) for i in entry["ids"]), (float(v) for v in entry["values"][key])))


def difference(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> Difference:
  """`a[key] - b[key]`: paired over shared examples when both carry per-example values.

  Paired needs at least two shared examples.

  Raises:
    KeyError: `key` missing from either metric dict.
  """
  for name, m in (("a", a), ("b", b)):
    if key not in m:
      raise KeyError(f"metric {key!r} missing from {name} (keys: {sorted(m)})")
  va, vb = example_values(a, key), example_values(b, key)
  if va is not None and vb is not None:
    shared = sorted(set(va) & set(vb))
    if len(shared) >= 2:
      d = np.asarray([va[i] - vb[i] for i in shared], np.float64)
      return Difference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)),
                        int(d.size), True)
  se = math.hypot(float(a.get(f"{key}_stderr", math.nan)),
                  float(b.get(f"{key}_stderr", math.nan)))
  n = min(int(a.get("num_examples", 0)), int(b.get("num_examples", 0)))
  return Difference(float(a[key]) - float(b[key]), se, n, False)


# The metrics each task's rows are compared on (headline first).
TASK_KEYS = {"next_item": ("recall@1", "recall@5", "recall@10", "ndcg@10"),
             "favorite_category": ("accuracy",),
             "review": ("rougeLsum", "reference_logprob", "search_errors")}


def compare_runs(reference: tuple[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                 other: tuple[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                 methods: tuple[str, str] | None = None, *,
                 groups: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
                 ) -> list[dict[str, Any]]:
  """Every method row and task the two runs share, compared metric by metric.

  Args:
    reference, other: (name, {method: {task: metric dict}}) of two runs, e.g. the
      `metrics` of two User-LLM runs' summaries evaluated on the same seeded test users
      (pretrained vs random encoder): `other - reference` per row, paired when both rows
      kept per-example values.
    methods: (reference's row, other's row) to compare these two rows only, e.g.
      ('user_llm', 'text_prompt') for a User-LLM run against a text-baseline run on the
      same test users; None compares every row the runs share. A row a run lacks is a
      `KeyError` naming the rows it has.
    groups: {task: {group: test ids}} to compare each task's headline metric within too;
      None takes the `GROUPS` a row of either run names (`task_groups`).

  Returns:
    One dict per (method, task, metric), then per group of the headline metric (`group`
    None for all users): values, n, the `Difference`'s fields, verdict ('ahead' /
    'behind' / 'tie' of `other` against `reference`) and a line of text.
  """
  (ref_name, ref), (other_name, oth) = reference, other
  if methods is None:
    pairs = [(m, m) for m in ref if m in oth]
  else:
    for (name, rows), method in zip(((ref_name, ref), (other_name, oth)), methods):
      if method not in rows:
        raise KeyError(f"run {name!r} has no method row {method!r}; it has {sorted(rows)}")
    pairs = [tuple(methods)]
  out = []
  for ref_method, method in pairs:
    for task in [t for t in ref[ref_method] if t in oth[method]]:
      for key in TASK_KEYS.get(task, ()):
        mine, theirs = oth[method][task], ref[ref_method][task]
        if key not in mine or key not in theirs:
          continue
        out.append(_compared(ref_name, other_name, ref_method, method, task, key,
                             theirs, mine))
        # Per group of test users, when either run names groups for the task (the
        # headline metric only).
        if key != TASK_KEYS[task][0]:
          continue
        task_ids = groups.get(task) if groups is not None else (
            task_groups(oth, task) or task_groups(ref, task))
        for group, ids in (task_ids or {}).items():
          sub_mine, sub_theirs = restrict(mine, ids, key), restrict(theirs, ids, key)
          if sub_mine is not None and sub_theirs is not None:
            out.append(_compared(ref_name, other_name, ref_method, method, task, key,
                                 sub_theirs, sub_mine, group=group))
  return out


def _compared(ref_name: str, other_name: str, ref_method: str, method: str, task: str,
              key: str, theirs: Mapping[str, Any], mine: Mapping[str, Any], *,
              group: str | None = None) -> dict[str, Any]:
  """One comparison of `compare_runs` (`other - reference`) with its line of text."""
  d = difference(mine, theirs, key)
  word = {"ahead": "ahead of", "behind": "BEHIND", "tie": "tied with"}[d.verdict]
  where = f" [{group}]" if group else ""
  return {
      "method": method, "reference_method": ref_method, "task": task, "metric": key,
      "group": group, "reference": ref_name, "other": other_name,
      "reference_value": float(theirs[key]), "other_value": float(mine[key]),
      **dataclasses.asdict(d), "verdict": d.verdict,
      "text": ((f"{method} {task} {key}{where}: " if method == ref_method else
                f"{method} vs {ref_method} {task} {key}{where}: ")
               + f"{other_name} {float(mine[key]):.3f} is {word} "
               f"{ref_name} {float(theirs[key]):.3f} ({d.describe()})")}


# (method row, task, metric, the rows it is compared with): the comparisons every User-LLM
# (and text-prompt) report states (task names as in `tasks.prompts`). The `count_*` rows
# are exact counts over what a method reads, `probe` a linear read-out of the encoder's
# states and `past_answer` the user's own earlier reviews (`eval/floors.py`): references
# from above, not floors.
COMPARISONS = (
    ("user_llm", "favorite_category", "accuracy",
     ("majority", "text_prompt", "user_llm_shuffled", "count_window", "count_prompt",
      "probe", "user_llm_copy_off")),
    # The text prompt against an exact count of the events it shows.
    ("text_prompt", "favorite_category", "accuracy", ("majority", "count_prompt")),
    ("user_llm", "next_item", "recall@10",
     ("popularity", "sasrec", "text_prompt", "user_llm_shuffled")),
    ("user_llm_item_head", "next_item", "recall@10",
     ("popularity", "sasrec", "text_prompt", "user_llm_item_head_shuffled",
      "user_llm_encoder_head")),
    # The item head's skip alone (the trained encoder's own head) against the pretrained one.
    ("user_llm_encoder_head", "next_item", "recall@10", ("sasrec",)),
    ("user_llm", "review", "rougeLsum",
     ("rating_prior", "text_prompt", "user_llm_shuffled", "past_answer", "user_llm_copy_off")),
    # The likelihood form of the shuffled control (`eval.review_likelihood`): does the real
    # context raise the reference answer, even where greedy decoding does not write it?
    ("user_llm", "review", "reference_logprob",
     ("user_llm_shuffled", "text_prompt", "user_llm_copy_off")),
)


def verdicts(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
  """Is User-LLM ahead of the floors, the text prompt and its own shuffled control (and the
  text prompt of its floors) by more than two standard errors of the difference, per task?
  One line per comparison of `COMPARISONS` whose two rows are in `metrics`
  ({method: {task: metrics}}).

  Every row of a run is measured on the same test users, so the difference is paired over
  them when both rows carry per-example values."""
  lines = []
  for row, task, key, others in COMPARISONS:
    mine = metrics.get(row, {}).get(task)
    if mine is None or key not in mine:
      continue
    for other in others:
      theirs = metrics.get(other, {}).get(task)
      if theirs is None or key not in theirs:
        continue
      diff = difference(mine, theirs, key)
      word = {"ahead": "ahead of", "behind": "BEHIND",
              "tie": "tied with (difference under 2 standard errors)"}[diff.verdict]
      lines.append(f"{task} {key}: {row} {float(mine[key]):.3f} is {word} {other} "
                   f"{float(theirs[key]):.3f} ({diff.describe()})")
  return lines


def restrict(metrics: Mapping[str, Any], ids: Sequence[int], key: str) -> dict[str, Any] | None:
  """A metric dict of `key` over the examples of `ids` that `metrics` kept per-example
  values for (None without per-example values or with none of the ids)."""
  values = example_values(metrics, key)
  if values is None:
    return None
  kept = [int(i) for i in ids if int(i) in values]
  if not kept:
    return None
  v = np.asarray([values[i] for i in kept], np.float64)
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
  return {key: float(v.mean()), f"{key}_stderr": se, "num_examples": len(kept),
          PER_EXAMPLE: per_example(kept, {key: v})}


def task_groups(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
                task: str) -> dict[str, list[int]]:
  """The `GROUPS` some row of `task` names ({} when none does)."""
  for by_task in metrics.values():
    groups = by_task.get(task, {}).get(GROUPS)
    if groups:
      return {g: [int(i) for i in ids] for g, ids in groups.items()}
  return {}


def group_breakdown(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    key: str | None = None,
                    ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
  """{task: {method: {group: {mean, stderr, n}}}} for every task whose rows name groups.

  Each row with per-example values of the task's headline metric (`TASK_KEYS`), or of
  `key` for the tasks that compare on it, is averaged over each group's ids."""
  out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
  for task, keys in TASK_KEYS.items():
    groups = task_groups(metrics, task)
    if not groups or (key is not None and key not in keys):
      continue
    metric = keys[0] if key is None else key
    for method, by_task in metrics.items():
      if task not in by_task:
        continue
      row = {}
      for group, ids in groups.items():
        sub = restrict(by_task[task], ids, metric)
        if sub is not None:
          row[group] = {"mean": sub[metric], "stderr": sub[f"{metric}_stderr"],
                        "n": sub["num_examples"]}
      if row:
        out.setdefault(task, {})[method] = row
  return out


def further_keys() -> tuple[str, ...]:
  """The metrics compared beside a task's headline (`TASK_KEYS`), each once."""
  return tuple(dict.fromkeys(k for keys in TASK_KEYS.values() for k in keys[1:]))


def breakdown_text(breakdown: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
                   key: str | None = None) -> str:
  """The `group_breakdown` (of `key`, default each task's headline) as lines: one per
  (task, method), 'group mean +- se (n)'."""
  lines = []
  for task, rows in breakdown.items():
    lines.append(f"{task} {key or TASK_KEYS[task][0]} by group of test users:")
    for method, row in rows.items():
      cells = ", ".join(f"{g} {c['mean']:.3f} +- {c['stderr']:.3f} (n = {c['n']})"
                        for g, c in row.items())
      lines.append(f"  {method}: {cells}")
  return "\n".join(lines)
