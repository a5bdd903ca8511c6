"""Paired differences between methods scored on the same test users (`eval.paired`)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from user_llm_jax.eval import paired
from user_llm_jax.eval import retrieval


def acc(ids, correct):
  """A favorite-category style metric dict with per-example values."""
  correct = np.asarray(correct, np.float64)
  p = float(correct.mean())
  return {"accuracy": p, "accuracy_stderr": math.sqrt(p * (1 - p) / correct.size),
          "num_examples": correct.size,
          paired.PER_EXAMPLE: paired.per_example(ids, {"accuracy": correct})}


def test_paired_difference_by_hand():
  a = acc([10, 11, 12, 13], [1, 1, 0, 1])
  b = acc([10, 11, 12, 13], [0, 1, 0, 0])
  d = paired.difference(a, b, "accuracy")
  # Per-user differences 1, 0, 0, 1: mean .5, sample std sqrt(1/3), SE sqrt(1/3) / 2.
  assert d.paired and d.n == 4
  assert d.diff == pytest.approx(0.5)
  assert d.se == pytest.approx(math.sqrt(1 / 3) / 2)
  assert d.verdict == "tie"            # .5 < 2 x .289
  assert "paired, n = 4" in d.describe()


def test_paired_over_shared_users_only_and_order_free():
  a = acc([1, 2, 3, 4], [1, 1, 1, 0])
  b = acc([4, 3, 2, 9], [0, 0, 1, 1])            # user 9 is not in a; 1 is not in b
  d = paired.difference(a, b, "accuracy")
  # Shared users 2, 3, 4: a = 1, 1, 0; b = 1, 0, 0.
  assert d.n == 3 and d.diff == pytest.approx(1 / 3)


def test_agreeing_methods_get_a_smaller_error_than_independent_samples():
  """Two methods right on the same 60 users, the second also on 12 more: unpaired, 72%
  vs 60% on 100 users is a tie; paired it is ahead (only 12 users differ, all one way)."""
  rng = np.random.default_rng(0)
  ids = rng.permutation(1000)[:100]
  b = np.zeros(100)
  b[:60] = 1
  a = b.copy()
  a[60:72] = 1
  d = paired.difference(acc(ids, a), acc(ids, b), "accuracy")
  unpaired = math.hypot(math.sqrt(.72 * .28 / 100), math.sqrt(.6 * .4 / 100))
  assert d.diff == pytest.approx(0.12) and abs(d.diff) < 2 * unpaired
  assert d.se < unpaired / 2 and d.verdict == "ahead"
  assert paired.difference(acc(ids, b), acc(ids, a), "accuracy").verdict == "behind"


def test_identical_answers_are_a_tie_and_missing_values_fall_back_to_unpaired():
  a = acc([1, 2, 3], [1, 0, 1])
  d = paired.difference(a, a, "accuracy")
  assert d.paired and d.diff == 0 and d.se == 0 and d.verdict == "tie"
  plain = {k: v for k, v in a.items() if k != paired.PER_EXAMPLE}
  d = paired.difference(plain, acc([1, 2, 3], [0, 0, 1]), "accuracy")
  assert not d.paired and d.n == 3
  assert d.se == pytest.approx(math.hypot(a["accuracy_stderr"], math.sqrt(1 / 3 * 2 / 3 / 3)))
  assert "unpaired" in d.describe()
  with pytest.raises(KeyError, match="recall@10"):
    paired.difference(a, a, "recall@10")


def test_per_example_rejects_mismatched_or_repeated_ids():
  with pytest.raises(ValueError, match="'accuracy' has 2 values for 3 ids"):
    paired.per_example([1, 2, 3], {"accuracy": [1, 0]})
  with pytest.raises(ValueError, match="distinct"):
    paired.per_example([1, 1], {"accuracy": [1, 0]})


def test_retrieval_keeps_per_example_values_of_unmasked_examples():
  acc_ = retrieval.RetrievalAccumulator(ks=(1, 5))
  acc_.add(np.array([0, 7, 3]), np.array([True, False, True]))
  acc_.add(np.array([12]))
  out = acc_.result(ids=[40, 41, 42])
  per = out[paired.PER_EXAMPLE]
  assert per["ids"] == [40, 41, 42]
  assert per["values"]["recall@1"] == [1.0, 0.0, 0.0]
  assert per["values"]["recall@5"] == [1.0, 1.0, 0.0]
  assert np.mean(per["values"]["ndcg@10"]) == pytest.approx(out["ndcg@10"])
  with pytest.raises(ValueError, match="2 example ids for 3 ranked examples"):
    acc_.result(ids=[1, 2])


def test_majority_floor_keeps_the_labelled_users():
  from user_llm_jax.data import schema  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top
  vocab = schema.Vocabulary(dataset="movielens", items=(), ratings=(),
                            categories=("<pad>", "<oov>", "Drama", "Comedy"))
  key = schema.FAVORITE_CATEGORY
  train = [{key: 3}, {key: 3}, {key: 2}]
  test = [{key: 3}, {key: schema.PAD_ID}, {key: 2}]
  m = floors.majority_category(train, test, vocab, ids=[7, 8, 9])
  assert m[paired.PER_EXAMPLE] == {"ids": [7, 9], "values": {"accuracy": [1.0, 0.0]}}


def _rows(fav_model, fav_control, ids):
  return {"user_llm": {"favorite_category": acc(ids, fav_model)},
          "user_llm_shuffled": {"favorite_category": acc(ids, fav_control)}}


def test_main_job_verdicts_are_paired():
  ids = list(range(100))
  control = np.zeros(100)
  control[:60] = 1
  model = control.copy()
  model[60:72] = 1
  lines = paired.verdicts(_rows(model, control, ids))
  assert len(lines) == 1 and "is ahead of user_llm_shuffled" in lines[0]
  assert "paired, n = 100" in lines[0]


def test_compare_runs_script(tmp_path):
  ids = list(range(50))
  rng = np.random.default_rng(1)
  base = (rng.random(50) < 0.5).astype(float)
  better = np.maximum(base, (rng.random(50) < 0.6).astype(float))
  runs = []
  for name, fav in (("pretrained", better), ("random", base)):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"metrics": _rows(fav, base, ids)}))
    runs.append(str(d))
  out = tmp_path / "compare.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.compare_runs",
                         f"--runs={','.join(runs)}", f"--output={out}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(out.read_text())
  row = {(r["method"], r["task"]): r for r in results}
  model = row[("user_llm", "favorite_category")]
  assert model["paired"] and model["n"] == 50
  assert model["diff"] == pytest.approx(base.mean() - better.mean())
  assert model["verdict"] == "behind"                         # random vs pretrained
  assert row[("user_llm_shuffled", "favorite_category")]["verdict"] == "tie"   # identical
  assert "random" in proc.stdout and "BEHIND" in proc.stdout
  missing = subprocess.run([sys.executable, "-m", "experiments.compare_runs",
                            f"--runs={runs[0]},{tmp_path / 'nope'}"],
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and "nope/summary.json: no summary.json" in missing.stderr


def test_compare_runs_named_rows_of_two_runs(tmp_path):
  """A User-LLM run against a text-baseline run: one named row of each, paired."""
  ids = list(range(40))
  rng = np.random.default_rng(2)
  text = (rng.random(40) < 0.3).astype(float)
  model = np.maximum(text, (rng.random(40) < 0.5).astype(float))
  ref = ("user_llm_run", {"user_llm": {"favorite_category": acc(ids, model)},
                          "majority": {"favorite_category": acc(ids, text)}})
  other = ("text_run", {"text_prompt": {"favorite_category": acc(ids, text)}})
  (out,) = paired.compare_runs(ref, other, ("user_llm", "text_prompt"))
  assert out["method"] == "text_prompt" and out["reference_method"] == "user_llm"
  assert out["paired"] and out["n"] == 40
  assert out["diff"] == pytest.approx(text.mean() - model.mean())
  assert out["text"].startswith("text_prompt vs user_llm favorite_category accuracy: text_run")
  # Without named rows the two runs share no row.
  assert not paired.compare_runs(ref, other)
  with pytest.raises(KeyError, match="run 'text_run' has no method row 'user_llm'"):
    paired.compare_runs(ref, other, ("user_llm", "user_llm"))
  # The script: one row per run, and a wrong count is a usage error.
  runs = []
  for name, metrics in (ref, other):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"metrics": metrics}))
    runs.append(str(d))
  proc = subprocess.run([sys.executable, "-m", "experiments.compare_runs",
                         f"--runs={','.join(runs)}", "--methods=user_llm,text_prompt"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "text_prompt vs user_llm" in proc.stdout and "paired, n = 40" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "experiments.compare_runs",
                        f"--runs={','.join(runs)}", "--methods=user_llm"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "one method row per run" in bad.stderr


def rouge(ids, values, groups=None):
  values = np.asarray(values, np.float64)
  out = {"rougeLsum": float(values.mean()),
         "rougeLsum_stderr": float(values.std(ddof=1) / math.sqrt(values.size)),
         "num_examples": values.size,
         paired.PER_EXAMPLE: paired.per_example(ids, {"rougeLsum": values})}
  if groups:
    out[paired.GROUPS] = groups
  return out


def test_rows_are_broken_down_by_the_groups_a_row_names(tmp_path):
  """The review groups (`floors.review_groups`): each row averaged over each group's ids,
  by hand; compared per group between runs, and from another run's groups (a text run
  names none)."""
  ids = list(range(6))
  groups = {"repeat_prior": [0, 1], "repeat_own": [2, 3, 4], "new": [5]}
  model = [1.0, 1.0, 0.0, 0.5, 0.0, 0.2]
  text = [1.0, 1.0, 1.0, 1.0, 0.5, 0.1]
  user_run = {"user_llm": {"review": rouge(ids, model)},
              "past_answer": {"review": rouge(ids, [1, 1, 1, 1, 1, 0], groups)}}
  text_run = {"text_prompt": {"review": rouge(ids, text)}}
  breakdown = paired.group_breakdown(user_run)["review"]
  own = breakdown["user_llm"]["repeat_own"]
  assert own["n"] == 3 and own["mean"] == pytest.approx(0.5 / 3)
  assert own["stderr"] == pytest.approx(np.std([0.0, 0.5, 0.0], ddof=1) / math.sqrt(3))
  assert breakdown["user_llm"]["repeat_prior"]["mean"] == 1.0
  assert math.isnan(breakdown["user_llm"]["new"]["stderr"])  # one user: no error
  assert breakdown["past_answer"]["new"]["mean"] == 0.0
  text_lines = paired.breakdown_text(paired.group_breakdown(user_run))
  assert "user_llm: repeat_prior 1.000" in text_lines and "repeat_own 0.167" in text_lines
  # A further metric of the task (the likelihood check's), by the same groups; rows
  # without its per-user values are left out.
  logp = [-1.0, -2.0, -9.0, -6.0, -3.0, -20.0]
  user_run["user_llm"]["review"]["per_example"]["values"]["reference_logprob"] = logp
  assert "reference_logprob" in paired.further_keys()
  by_logp = paired.group_breakdown(user_run, "reference_logprob")["review"]
  assert set(by_logp) == {"user_llm"}
  assert by_logp["user_llm"]["repeat_own"]["mean"] == pytest.approx(-6.0)
  assert by_logp["user_llm"]["repeat_prior"]["mean"] == pytest.approx(-1.5)
  assert "review reference_logprob by group" in paired.breakdown_text(
      {"review": by_logp}, "reference_logprob")
  assert paired.group_breakdown(user_run, "recall@5") == {}   # no groups for next item
  # The text run names no groups; the reference run's are used.
  results = paired.compare_runs(("user_llm_run", user_run), ("text_run", text_run),
                                ("user_llm", "text_prompt"))
  by_group = {r["group"]: r for r in results}
  assert set(by_group) == {None, "repeat_prior", "repeat_own", "new"}
  assert by_group["repeat_own"]["diff"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
  assert by_group["repeat_own"]["paired"] and by_group["repeat_own"]["n"] == 3
  assert by_group["repeat_prior"]["verdict"] == "tie"   # identical
  assert "[repeat_own]" in by_group["repeat_own"]["text"]
  # Given groups win over the rows' own; none given and none named: no group lines.
  only = paired.compare_runs(("a", text_run), ("b", text_run), groups={"review": {"x": [5]}})
  assert [r["group"] for r in only] == [None, "x"]
  assert [r["group"] for r in paired.compare_runs(("a", text_run), ("b", text_run))] == [None]
  # The script takes them from another run's summary, and names a run without any.
  dirs = {}
  for name, metrics in (("user", user_run), ("text", text_run)):
    dirs[name] = tmp_path / name
    dirs[name].mkdir()
    (dirs[name] / "summary.json").write_text(json.dumps({"metrics": metrics}))
  args = [sys.executable, "-m", "experiments.compare_runs",
          f"--runs={dirs['text']},{dirs['text']}"]
  proc = subprocess.run(args + [f"--groups_from={dirs['user']}"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "text_prompt review rougeLsum [repeat_own]" in proc.stdout
  bad = subprocess.run(args + [f"--groups_from={dirs['text']}"], capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "no row names groups" in bad.stderr
