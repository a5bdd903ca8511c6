"""The User-LLM study benchmark on its smoke variant (tiny random LLM, three arms)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.benchmarks import user_llm_study as study
from experiments.configs import user_llm_study as study_config
from user_llm_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  output = tmp_path_factory.mktemp("study") / "study.json"
  report = study.run_study("smoke", str(output))
  return output, report


def _mtimes(root: pathlib.Path) -> dict[str, float]:
  """Every file's mtime in the subdirectories (arms, data, encoder) of the study's root."""
  return {str(p): p.stat().st_mtime for p in root.rglob("*")
          if p.is_file() and p.parent != root}


def test_report_has_every_arm_with_n_and_standard_errors(smoke):
  output, _ = smoke
  report = json.loads(output.read_text())
  assert report["complete"] is True and report["steps"] == 4
  assert list(report["arms"]) == list(study_config.SMOKE_ARMS)
  for name, arm in report["arms"].items():
    fav = arm["fav_acc"]
    assert 0.0 <= fav["value"] <= 1.0 and fav["n"] == 3, name
    assert math.isfinite(fav["stderr"]) and fav["stderr"] >= 0, name
    assert 0 < arm["trainable_params"] <= arm["total_params"], name
    assert arm["steps"] == 4 and arm["train_sec"] > 0 and arm["sec_per_answer"] > 0, name
    assert (output.parent / name / "summary.json").exists()
    assert arm["reused"] is False and arm["same_as"] is None
  for name in ("user_llm", "random_encoder"):
    arm = report["arms"][name]
    for key in ("item_head_recall@10", "shuffled_fav_acc"):
      assert arm[key]["n"] == 3 and math.isfinite(arm[key]["stderr"]), (name, key)
    # The learning curve: every train.eval_every=2 steps, on eval.curve_examples users.
    assert [c["step"] for c in arm["curve"]] == [2, 4]
    assert all(0.0 <= c["fav_acc"] <= 1.0 for c in arm["curve"])
  text = report["arms"]["text_lora"]
  assert text["job"] == "text_baseline" and text["item_head_recall@10"] is None
  # The text prompt's learning curve: the same steps and procedure as User-LLM's.
  assert [c["step"] for c in text["curve"]] == [2, 4]
  assert all(set(c) == {"step", "fav_acc"} for c in text["curve"])
  assert text["trainable_params"] < report["arms"]["user_llm"]["trainable_params"]
  # Only the pretrained-encoder arm read the data group's encoder pretraining run.
  assert (output.parent / "data" / "default" / "encoder" / "summary.json").exists()
  assert report["arms"]["user_llm"]["floors"]["majority"]["n"] == 3
  # Every arm's exact count of what it reads: the encoder's window, the text prompt's events.
  for name, arm in report["arms"].items():
    assert arm["count_fav_acc"]["n"] == 3, name
  assert (report["arms"]["user_llm"]["count_fav_acc"]["value"]
          == report["arms"]["random_encoder"]["count_fav_acc"]["value"])  # the same window
  # The probe reads a pretrained encoder's states: none for the random-encoder arm.
  assert report["arms"]["user_llm"]["probe_fav_acc"]["n"] == 3
  assert report["arms"]["random_encoder"]["probe_fav_acc"] is None
  assert "sasrec" not in report["arms"]["random_encoder"]["floors"]


def test_verdicts_call_differences_under_two_standard_errors_ties(smoke):
  _, report = smoke
  verdicts = report["verdicts"]
  pairs = {(v["a"], v["b"], v["metric"]) for v in verdicts}
  assert ("text_lora", "user_llm", "fav_acc") in pairs
  assert ("random_encoder", "user_llm", "item_head_recall@10") in pairs
  assert ("user_llm", "user_llm shuffled users (control)", "fav_acc") in pairs
  assert ("text_lora", "text_lora: exact count of the events it reads", "fav_acc") in pairs
  for v in verdicts:
    tie = not abs(v["diff"]) > v["two_se"] or v["two_se"] == 0
    assert (v["verdict"] == "tie") == tie, v
  # The rule itself, on figures with known standard errors.
  fig = lambda value, se: {"value": value, "stderr": se, "n": 100}
  assert study.compare("m", "a", fig(0.50, 0.03), "b", fig(0.40, 0.03))["verdict"] == "ahead"
  assert study.compare("m", "a", fig(0.40, 0.05), "b", fig(0.50, 0.05))["verdict"] == "tie"
  assert study.compare("m", "a", fig(0.10, 0.01), "b", fig(0.30, 0.01))["verdict"] == "behind"


def test_table_and_learning_curve_plot(smoke):
  output, report = smoke
  text = output.with_suffix(".md").read_text()
  for name in study_config.SMOKE_ARMS:
    assert name in text and name in report["table"]
  assert "+-" in text and "item-head R@10" in text and "verdicts" in text
  assert "majority genre (floor)" in text and "count of its view" in text
  png = output.with_suffix(".png")
  assert report["plot"] == str(png)
  assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_rerun_of_the_script_reuses_finished_arms(smoke):
  output, report = smoke
  before = _mtimes(output.parent)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.user_llm_study", f"--output={output}",
       "--variant=smoke"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fav_acc" in proc.stdout and "verdicts" in proc.stdout
  assert "(smoke, 4 training steps per arm)" in proc.stdout
  # No arm trained again: checkpoints, summaries and TensorBoard files are untouched.
  after = _mtimes(output.parent)
  assert before and {k: after.get(k) for k in before} == before
  again = json.loads(output.read_text())
  for name, arm in again["arms"].items():
    assert arm["reused"] is True
    assert arm["fav_acc"] == report["arms"][name]["fav_acc"]


def test_a_finished_arm_with_a_changed_config_is_refused(smoke):
  output, _ = smoke
  arm = study.resolve_arms("smoke", ["user_llm"], str(output.parent))[0]
  arm.config.train.learning_rate = 0.5
  with pytest.raises(study.StudyConfigChanged, match="train.learning_rate"):
    study.run_or_reuse(arm.config, arm.workdir, "arm user_llm")


def test_cpu_arms_resolve_to_jobs_data_groups_and_shared_runs(tmp_path):
  arms = {a.name: a for a in study.resolve_arms("cpu", list(study_config.ARMS), str(tmp_path))}
  assert set(arms) == set(study_config.ARMS)
  # Identical configs run once: Enc is the default strategy, 50 events the default data.
  for name in ("strategy_enc", "history_50"):
    assert arms[name].same_as == "user_llm" and arms[name].workdir == arms["user_llm"].workdir
  assert sum(a.same_as is None for a in arms.values()) == 23
  ref = arms["user_llm"].config
  assert ref.job == "train_user_llm" and ref.train.num_steps == study_config.STEPS
  assert ref.train.eval_every > 0 and ref.eval.curve_examples > 0
  assert ref.encoder.init == "pretrained"
  assert ref.encoder.workdir == str(tmp_path / "data" / "default" / "encoder")
  # The random-encoder override survives the stage config, and needs no pretraining.
  assert arms["random_encoder"].config.encoder.init == "random"
  assert arms["random_encoder"].encoder is None
  text = arms["text_lora"].config
  assert (text.job, text.baseline.strategy) == ("text_baseline", "lora")
  assert text.train.num_steps == ref.train.num_steps and arms["text_lora"].encoder is None
  for events in (200, 500):
    arm = arms[f"history_{events}"]
    assert arm.config.data.window == events
    assert arm.config.data.synthetic.events_per_user_mean == 1.2 * events
    assert arm.data_root != arms["user_llm"].data_root
    assert arm.config.data.data_dir == os.path.join(arm.data_root, "data")
    assert arm.encoder.data.window == events
  # The text prompt on the 500-event data shares that data (not the encoder: it has none).
  text_500 = arms["text_lora_500"]
  assert text_500.data_root == arms["history_500"].data_root and text_500.encoder is None
  assert text_500.config.job == "text_baseline" and text_500.config.data.window == 500
  # The pooled-state arm: the 500-event data and encoder, one bridge option changed.
  pooled = arms["pooled_500"]
  assert pooled.data_root == arms["history_500"].data_root
  assert pooled.config.bridge.pooled_context is True
  assert arms["history_500"].config.bridge.pooled_context is False
  assert arms["standardized_500"].config.bridge.standardize_states is True
  assert arms["standardized_500"].data_root == arms["history_500"].data_root
  # The favorite-only arm trains on exactly the text arm's task.
  fav_only = arms["fav_only_500"].config
  assert tuple(fav_only.tasks.names) == tuple(text_500.config.tasks.names)
  assert fav_only.train.num_steps == text_500.config.train.num_steps
  assert arms["perceiver"].config.bridge.use_perceiver is True
  assert arms["item_head_skip"].config.bridge.item_head_skip is True
  frozen = arms["item_head_skip_frozen"].config.bridge
  assert frozen.item_head_skip is True and frozen.item_head_skip_frozen is True
  assert arms["item_head_skip"].config.bridge.item_head_skip_frozen is False
  assert {arms[f"strategy_{s}"].config.strategy for s in ("lora", "full", "proj")} == {
      "lora", "full", "proj"}


def test_steps_set_every_arms_llm_budget_but_not_the_encoders(tmp_path):
  default = study.resolve_arms("cpu", ["history_500"], str(tmp_path))[0]
  arms = study.resolve_arms("cpu", ["history_500", "text_lora_500"], str(tmp_path), steps=250)
  assert [a.config.train.num_steps for a in arms] == [250, 250]
  assert arms[0].encoder.train.num_steps == default.encoder.train.num_steps
  with pytest.raises(config_lib.ConfigError, match="steps must be >= 1, got 0"):
    study.resolve_arms("cpu", ["user_llm"], str(tmp_path), steps=0)


def test_bad_arms_are_clear_errors(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="unknown study arms.*nope.*known: user_llm"):
    study.resolve_arms("smoke", ["user_llm", "nope"], str(tmp_path))
  config = study_config.get_config("smoke")
  with pytest.raises(config_lib.ConfigError, match="arm 'x'.*'bridge.nope'.*use_perceiver"):
    study.apply_overrides(config, {"bridge.nope": 1}, "x")
  with pytest.raises(config_lib.ConfigError, match="arm 'x'.*no section 'brige'"):
    study.apply_overrides(config, {"brige.mode": "soft_prompt"}, "x")


def _fig(value: float, stderr: float, n: int = 100) -> dict[str, float]:
  return {"value": value, "stderr": stderr, "n": n}


def test_verdicts_compare_same_data_pairs_and_each_data_own_floor():
  def entry(fav, window, majority=None):
    return {"same_as": None, "window": window, "fav_acc": _fig(*fav),
            "item_head_recall@10": None,
            "floors": {"majority": _fig(*majority)} if majority else {}}
  arms = {"user_llm": entry((.4, .05), 50, (.15, .035)),
          "history_500": entry((.6, .05), 500, (.2, .04)),
          "text_lora_500": entry((.3, .045), 500)}
  pairs = {(v["a"], v["b"]): v for v in study.verdicts(arms, "user_llm")}
  assert ("history_500", "text_lora_500") in pairs
  own_floor = [k for k in pairs if k[0] == "history_500" and "history_500 data" in k[1]]
  assert len(own_floor) == 1
  # The reference's floor is not applied to the other data's arm.
  assert not any(k[0] == "history_500" and k[1].startswith("majority") for k in pairs)


@pytest.mark.parametrize("name,mult,strategy", [("soft_prompt_fav_only_lr10", 10.0, "enc"),
                                                 ("soft_prompt_fav_only_lr30", 30.0, "enc"),
                                                 ("soft_prompt_lora_fav_only_lr10", 10.0,
                                                  "lora")])
def test_soft_prompt_lr_arm_keeps_the_gate_rule_and_adds_the_bridges(tmp_path, name, mult,
                                                                     strategy):
  arm = study.resolve_arms("cpu", [name], str(tmp_path))[0]
  assert arm.same_as is None
  assert tuple(map(tuple, arm.config.train.lr_mults)) == (("_gate$", 100.0), ("^bridge/", mult))
  assert arm.config.strategy == strategy
  assert arm.config.bridge.mode == "soft_prompt"
  assert tuple(arm.config.tasks.names) == ("favorite_category",)
