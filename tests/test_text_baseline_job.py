"""The text-prompt baseline job trains (LoRA / Full) and evaluates on tiny synthetic data."""

import json
import math

import pytest

from experiments.configs import user_llm_movielens
from user_llm_jax import config as config_lib
from user_llm_jax.jobs import pretrain_encoder
from user_llm_jax.jobs import text_baseline


def smoke_config(**changes):
  config = user_llm_movielens.get_config("smoke")
  config.job = "text_baseline"
  config.train.num_steps = 4
  config.train.checkpoint_every = 4
  config.eval.num_examples = 3
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("text_data")
  pretrain_encoder.prepare_data(smoke_config().data, str(root))
  return {"data.manual_dir": str(root / "raw"), "data.data_dir": str(root / "data")}


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
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["trainable_params"] == summary["trainable_params"]
  assert f"({strategy}," in (tmp_path / "summary.txt").read_text()


def test_unknown_strategy_is_a_config_error(tmp_path, data_dirs):
  with pytest.raises(config_lib.ConfigError, match="baseline.strategy"):
    text_baseline.run(smoke_config(**data_dirs, **{"baseline.strategy": "prefix"}),
                      str(tmp_path))
