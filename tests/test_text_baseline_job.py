"""The text-prompt baseline job trains (LoRA / Full) and evaluates on tiny synthetic data."""

import json
import math

import pytest

from tests import test_user_llm_job
from tests.test_user_llm_job import data_dirs  # pylint: disable=unused-import  (shared fixture)
from user_llm_jax import config as config_lib
from user_llm_jax.jobs import text_baseline


def smoke_config(**changes):
  """The User-LLM job's smoke config, as the text-prompt baseline job with a 4-step budget."""
  return test_user_llm_job.smoke_config(**{
      "job": "text_baseline", "train.num_steps": 4, "train.checkpoint_every": 4,
      "eval.num_examples": 3, **changes})


def config_window(summary) -> int:
  return int(summary["dataset"]["window"])


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_trained_text_baseline(tmp_path, data_dirs, strategy):
  summary = text_baseline.run(smoke_config(**data_dirs, **{"baseline.strategy": strategy}),
                              str(tmp_path))
  assert summary["strategy"] == strategy and summary["steps"] == 4
  assert summary["budget"]["examples_seen"] == 4 * 8
  if strategy == "full":
    assert summary["trainable_params"] == summary["total_params"]
  else:  # only the rank-8 adapters on q and v train
    assert 0 < summary["trainable_params"] < summary["total_params"] // 10
  assert all(math.isfinite(h["loss"]) for h in summary["history"])
  metrics = summary["metrics"]["text_prompt"]
  assert 0.0 <= metrics["favorite_category"]["accuracy"] <= 1.0
  assert metrics["next_item"]["num_examples"] == 3
  # The mean prompt length covers every evaluated example of every task.
  per_task = [(m["mean_prompt_tokens"], m["num_examples"]) for m in metrics.values()]
  assert len(per_task) == 2
  assert summary["mean_prompt_tokens"] == pytest.approx(
      sum(t * n for t, n in per_task) / sum(n for _, n in per_task))
  assert per_task[0][0] != per_task[1][0]   # the two tasks' prompts differ in length
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["trainable_params"] == summary["trainable_params"]
  assert f"({strategy}," in (tmp_path / "summary.txt").read_text()
  assert summary["curve"] == []   # train.eval_every = 0: no learning curve
  # The exact count of the events each prompt shows, on the same users, with its verdict.
  count = summary["metrics"]["count_prompt"]["favorite_category"]
  fav = metrics["favorite_category"]
  assert count["per_example"]["ids"] == fav["per_example"]["ids"]
  assert 0 < count["events_counted_mean"] <= config_window(summary)
  assert any(v.startswith("favorite_category accuracy: text_prompt ") and " count_prompt " in v
             for v in summary["verdicts"])
  assert "count_prompt" in (tmp_path / "summary.txt").read_text()


def test_text_baseline_learning_curve_is_the_user_llm_procedure(tmp_path, data_dirs):
  """Every train.eval_every steps, favorite-category accuracy on eval.curve_examples users:
  the final model's point equals the final evaluation on the same users."""
  config = smoke_config(**data_dirs, **{
      "baseline.strategy": "lora", "train.eval_every": 2, "eval.curve_examples": 3})
  summary = text_baseline.run(config, str(tmp_path))
  assert [c["step"] for c in summary["curve"]] == [2, 4]
  final = summary["metrics"]["text_prompt"]["favorite_category"]
  assert final["num_examples"] == 3
  assert summary["curve"][-1]["fav_acc"] == pytest.approx(final["accuracy"])
  assert json.loads((tmp_path / "summary.json").read_text())["curve"] == summary["curve"]


def test_unknown_strategy_is_a_config_error(tmp_path, data_dirs):
  with pytest.raises(config_lib.ConfigError, match="baseline.strategy"):
    text_baseline.run(smoke_config(**data_dirs, **{"baseline.strategy": "prefix"}),
                      str(tmp_path))
