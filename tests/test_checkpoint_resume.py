"""Killing the launcher (SIGKILL) and rerunning it ends exactly like an uninterrupted run;
SIGTERM saves a checkpoint and exits cleanly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "encoder_movielens.py"
NUM_STEPS = 20
# The smoke config shrunk further so that one launch takes seconds.
OVERRIDES = (
    "--config.data.synthetic.num_users=60", "--config.data.synthetic.num_items=80",
    "--config.data.synthetic.events_per_user_mean=30", "--config.data.window=16",
    "--config.encoder.model.num_layers=1", "--config.encoder.model.width=32", "--config.encoder.model.mlp_dim=64",
    "--config.encoder.model.feature_dim=16", "--config.train.batch_size=16",
    f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
    "--config.train.log_every=4", "--config.train.eval_every=10", "--config.eval.batch_size=64",
)


def command(workdir: pathlib.Path, raw: pathlib.Path | None = None) -> list[str]:
  extra = [f"--config.data.manual_dir={raw}"] if raw is not None else []
  return [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:smoke",
          f"--workdir={workdir}", *OVERRIDES, *extra]


ENV = dict(os.environ, PYTHONPATH=str(REPO),
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


def run(workdir, raw=None) -> subprocess.CompletedProcess:
  proc = subprocess.run(command(workdir, raw), cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def steps(workdir: pathlib.Path) -> list[int]:
  ckpt = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def start_and_signal(workdir, raw, sig) -> subprocess.Popen:
  """Starts a run and sends `sig` as soon as its first checkpoint is finalized."""
  proc = subprocess.Popen(command(workdir, raw), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not steps(workdir):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  proc.send_signal(sig)
  return proc


def final_params(workdir: pathlib.Path) -> dict:
  path = workdir / "checkpoints" / str(NUM_STEPS) / "model"
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run; its generated raw data is reused by the other runs."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run(workdir)
  return workdir


def test_sigkill_then_rerun_matches_uninterrupted(reference, tmp_path):
  raw = reference / "raw"
  workdir = tmp_path / "killed"
  proc = start_and_signal(workdir, raw, signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = steps(workdir)
  assert killed_at and max(killed_at) < NUM_STEPS, killed_at
  assert not (workdir / "summary.json").exists()

  resumed = run(workdir, raw)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] == max(killed_at), resumed.stderr[-2000:]
  # The uninterrupted reference generated these raw files itself: same data, same config.
  ref = json.loads((reference / "summary.json").read_text())
  assert ref["resumed_from"] is None
  assert summary["metrics"] == ref["metrics"]
  assert summary["history"] == ref["history"]
  assert summary["evals"] == ref["evals"]
  a, b = final_params(workdir), final_params(reference)
  leaves_a, leaves_b = jax_leaves(a), jax_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)  # Bit-identical.


def test_sigterm_saves_and_exits_cleanly(reference, tmp_path):
  workdir = tmp_path / "terminated"
  proc = start_and_signal(workdir, reference / "raw", signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGTERM received" in stderr
  saved = steps(workdir)
  assert saved and max(saved) < NUM_STEPS
  assert not (workdir / "summary.json").exists()  # An unfinished run writes no summary.


def test_reference_run_is_complete(reference):
  summary = json.loads((reference / "summary.json").read_text())
  assert summary["steps"] == NUM_STEPS and summary["resumed_from"] is None
  assert steps(reference)[-1] == NUM_STEPS


def jax_leaves(tree) -> list[np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
