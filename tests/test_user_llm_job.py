"""User-LLM jobs end to end on the smoke configs (tiny random LLM, tiny encoder).

Every test here compiles a train step and evaluation functions, so the file is marked slow;
the smoke data is generated once per module.
"""

import json
import os
import shutil

import numpy as np
import pytest
from absl import flags

from experiments.configs import main as main_config
from experiments.configs import user_llm_movielens
from user_llm_jax.jobs import generate
from user_llm_jax.jobs import main_pipeline
from user_llm_jax.jobs import train_user_llm

pytestmark = pytest.mark.slow


def smoke_config(**changes):
  config = user_llm_movielens.get_config("smoke")
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """Synthetic raw data + its preparation, shared by the runs of this module."""
  root = tmp_path_factory.mktemp("smoke_data")
  from user_llm_jax.jobs import pretrain_encoder  # pylint: disable=g-import-not-at-top
  pretrain_encoder.prepare_data(smoke_config().data, str(root))
  return {"data.manual_dir": str(root / "raw"), "data.data_dir": str(root / "data")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dirs):
  workdir = tmp_path_factory.mktemp("user_llm_run")
  summary = train_user_llm.run(smoke_config(**data_dirs), str(workdir))
  return workdir, summary


def test_job_writes_summary_with_metrics(finished_run, data_dirs):
  workdir, summary = finished_run
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk["steps"] == 6
  metrics = on_disk["metrics"]
  for k in ("recall@1", "recall@5", "recall@10"):
    assert 0.0 <= metrics["user_llm"]["next_item"][k] <= 1.0
    assert 0.0 <= metrics["popularity"]["next_item"][k] <= 1.0
  r = metrics["user_llm"]["next_item"]
  assert r["recall@1"] <= r["recall@5"] <= r["recall@10"]
  assert metrics["user_llm"]["next_item"]["num_examples"] == 6
  assert "exact scoring" in metrics["user_llm"]["next_item"]["procedure"]
  assert 0.0 <= metrics["user_llm"]["favorite_category"]["accuracy"] <= 1.0
  # The majority-label floor, recomputed from the prepared records the job read.
  data = train_user_llm.load_task_data(smoke_config(**data_dirs), str(workdir))
  labels = [int(r["favorite_category"]) for r in data.train]
  best = max(set(labels), key=lambda c: (labels.count(c), -c))
  idx = train_user_llm.eval_indices(len(data.test), 6, 0)
  expected = np.mean([int(data.test[i]["favorite_category"]) == best for i in idx])
  majority = metrics["majority"]["favorite_category"]
  assert majority["answer"] == data.vocab.categories[best]
  assert majority["accuracy"] == pytest.approx(expected)
  assert "majority" in (workdir / "summary.txt").read_text()
  # Enc strategy: encoder + bridge train, the LLM does not.
  groups = on_disk["param_groups"]
  assert on_disk["trainable_params"] == groups["encoder"] + groups["bridge"]
  assert on_disk["total_params"] == sum(groups.values()) > on_disk["trainable_params"]
  assert "recall@10" in (workdir / "summary.txt").read_text()
  assert summary["history"][-1]["step"] == 6


def test_resume_of_a_user_llm_run_is_exact(finished_run, tmp_path, data_dirs):
  workdir, summary = finished_run
  run2 = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints", run2 / "checkpoints")
  # Drop the final checkpoint: the rerun restores step 3 and trains steps 4-6 again.
  shutil.rmtree(run2 / "checkpoints" / "6")
  resumed = train_user_llm.run(smoke_config(**data_dirs), str(run2))
  assert resumed["resumed_from"] == 3
  assert resumed["trainable_checksum"] == summary["trainable_checksum"]
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in summary["history"]]
  assert resumed["metrics"]["user_llm"] == summary["metrics"]["user_llm"]


def test_soft_prompt_perceiver_lora_with_random_encoder(tmp_path, data_dirs):
  config = smoke_config(**data_dirs, **{
      "bridge.mode": "soft_prompt", "bridge.use_perceiver": True, "strategy": "lora",
      "train.num_steps": 2, "eval.num_examples": 2, "tasks.names": ("favorite_category",)})
  summary = train_user_llm.run(config, str(tmp_path))
  groups = summary["param_groups"]
  assert groups["llm_lora"] > 0
  assert summary["trainable_params"] == groups["encoder"] + groups["bridge"] + groups["llm_lora"]
  assert summary["metrics"]["user_llm"]["favorite_category"]["num_examples"] == 2


def test_main_pipeline_smoke_and_generate(tmp_path):
  workdir = tmp_path / "main"
  config = main_config.get_config("smoke")
  summary = main_pipeline.run(config, str(workdir))
  methods = list(summary["metrics"])
  assert methods[0].startswith("User-LLM") and methods[1].startswith("text prompt")
  assert {"SASRec-style encoder", "popularity"} <= set(methods)
  for name in methods[:2]:
    assert 0.0 <= summary["metrics"][name]["next_item"]["recall@10"] <= 1.0
  gen = summary["generation"]
  assert gen["recent"] and set(gen["answers"]) == {"next_item", "favorite_category"}
  for stage in ("encoder", "user_llm", "text_baseline"):
    assert (workdir / stage / "summary.json").exists()
  text = (workdir / "summary.txt").read_text()
  assert "personalized generation" in text and "SASRec-style" in text

  # Rerunning reuses every finished stage.
  mtime = os.path.getmtime(workdir / "user_llm" / "summary.json")
  again = main_pipeline.run(config, str(workdir))
  assert os.path.getmtime(workdir / "user_llm" / "summary.json") == mtime
  assert again["metrics"] == summary["metrics"]

  # --mode=generate on a user's own MovieLens-format history.
  history = tmp_path / "me.csv"
  history.write_text("userId,movieId,rating,timestamp\n7,1,4.0,100\n7,2,3.5,200\n"
                     "7,999999,5.0,300\n")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  flags.FLAGS.history_file = str(history)
  try:
    out = generate.run(config, str(workdir))
  finally:
    flags.FLAGS.history_file = None
  assert isinstance(out["answer"], str) and len(out["recent"]) == 3


def test_history_file_errors_name_file_and_line(tmp_path, data_dirs):
  from user_llm_jax.data import source  # pylint: disable=g-import-not-at-top
  _, vocab, _ = source.load_prepared(data_dirs["data.data_dir"], "train")
  bad = tmp_path / "bad.csv"
  bad.write_text("userId,movieId,rating,timestamp\n1,1,x,5\n")
  with pytest.raises(ValueError, match=r"bad.csv:2"):
    generate.history_record(str(bad), vocab)
  good = tmp_path / "good.jsonl"
  good.write_text('{"movieId": "2", "rating": 4.0, "timestamp": 2}\n'
                  '{"movieId": "1", "rating": 3.0, "timestamp": 1}\n')
  record = generate.history_record(str(good), vocab)
  # Sorted by time, plus the placeholder target after the last event.
  assert record["item_ids"].tolist()[-1] == 0 and len(record["item_ids"]) == 3
  assert np.all(np.diff(record["timestamps"]) >= 0)
