"""End to end: the launcher generates, prepares, trains, evaluates and writes its summary."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "encoder_movielens.py"
ENV = dict(os.environ, PYTHONPATH=str(REPO),
           XLA_FLAGS="--xla_force_host_platform_device_count=1")
# `:smoke`, shrunk so the whole launch takes seconds.
SHRINK = (
    "--config.data.synthetic.num_users=80", "--config.data.synthetic.num_items=60",
    "--config.data.synthetic.events_per_user_mean=30", "--config.data.window=16",
    "--config.encoder.model.num_layers=1", "--config.encoder.model.width=32", "--config.encoder.model.mlp_dim=64",
    "--config.encoder.model.feature_dim=16", "--config.train.batch_size=16",
    "--config.train.num_steps=30", "--config.train.log_every=10",
    "--config.train.eval_every=15", "--config.train.checkpoint_every=15",
    "--config.eval.batch_size=64",
)


def launch(workdir, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:smoke",
       f"--workdir={workdir}", *SHRINK, *extra],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_summary_json_has_encoder_and_popularity_metrics(smoke_run):
  workdir, _ = smoke_run
  summary = json.loads((workdir / "summary.json").read_text())
  metrics = summary["metrics"]
  for key in ("recall@1", "recall@5", "recall@10", "ndcg@10"):
    assert 0.0 <= metrics[key] <= 1.0
  pop = [k for k in metrics if "pop" in k and k.endswith("recall@10")]
  assert pop, sorted(metrics)
  assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
  assert summary["config_name"] == "encoder_movielens:smoke"
  assert summary["steps"] == 30
  assert 0 < summary["trainable_params"] <= summary["total_params"]
  assert summary["wall_time_sec"] > 0
  assert summary["dataset"]["statistics"]["users_kept"] == 80
  # Training reduced the loss.
  assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
  assert [e["step"] for e in summary["evals"]] == [15, 30]


def test_human_readable_outputs(smoke_run):
  workdir, proc = smoke_run
  text = (workdir / "summary.txt").read_text()
  assert "encoder" in text and "popularity" in text and "recall@10" in text
  assert "recall@10" in proc.stdout  # The table is printed at the end.
  assert (workdir / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_rerun_of_finished_workdir_does_not_retrain(smoke_run):
  workdir, _ = smoke_run
  before = json.loads((workdir / "summary.json").read_text())
  proc = launch(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = json.loads((workdir / "summary.json").read_text())
  assert after["resumed_from"] == 30
  assert after["metrics"] == before["metrics"]


def test_missing_data_dir_is_a_clear_error(tmp_path):
  proc = launch(tmp_path / "w", f"--config.data.manual_dir={tmp_path / 'nope'}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert "data.manual_dir" in last and str(tmp_path / "nope") in last, proc.stderr
  assert not (tmp_path / "w" / "summary.json").exists()


def test_empty_dataset_is_a_clear_error(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
  (raw / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
  proc = launch(tmp_path / "w", f"--config.data.manual_dir={raw}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "error:" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w" / "summary.json").exists()
