"""Best-step selection and early stopping: the selector alone, in the trainer with a
validation metric that peaks early, and after a SIGKILL and a rerun."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import sharding as sharding_lib
from user_llm_jax.train import early_stopping
from user_llm_jax.train import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


class Walker(nnx.Module):
  """One parameter that Adam walks monotonically from 0 towards 10 (about lr per step),
  so a validation metric of it peaks at a step known from its trajectory."""

  def __init__(self):
    init = sharding_lib.partitioned(nnx.initializers.zeros, (None,))
    self.w = nnx.Param(init(jax.random.key(0), (1,)))


def walker_loss(model, batch):
  loss = jnp.mean((model.w[...][0] - 10.0) ** 2 + 0.0 * batch["x"])
  return loss, {"w": model.w[...][0]}


def peaked_eval_of(w: float) -> float:
  # Highest at w = 0.55, which the walk passes early: a curve that peaks, then falls.
  return -(w - 0.55) ** 2


def peaked_eval(model):
  return {"val/ndcg@10": float(peaked_eval_of(float(model.w[...][0])))}


def batches():
  ds = grain.MapDataset.source([{"x": np.float32(i)} for i in range(32)]).repeat()
  return iter(ds.batch(4, drop_remainder=True).to_iter_dataset())


def config(**kw):
  # A constant learning rate (end fraction 1): the walk does not depend on num_steps.
  base = dict(batch_size=4, num_steps=60, learning_rate=0.05, warmup=0, weight_decay=0.0,
              grad_clip=0.0, log_every=2, eval_every=2, checkpoint_every=4,
              end_lr_fraction=1.0, select_metric="val/ndcg@10", patience=3)
  base.update(kw)
  return trainer_lib.TrainConfig(**base)


def train(cfg, workdir=None, count_fn=None):
  mesh = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return trainer_lib.train(Walker(), walker_loss, cfg, batches(), mesh=mesh, seed=0,
                           workdir=workdir, eval_fn=peaked_eval, count_fn=count_fn)


def w_of(model) -> float:
  return float(model.w[...][0])


class TestSelector:

  def test_best_and_patience(self):
    es = early_stopping.EarlyStopping("val/ndcg@10", patience=2)
    seen = [es.update(s, {"val/ndcg@10": v}) for s, v in
            [(10, .1), (20, .3), (30, .2), (40, .3), (50, .25)]]
    assert seen == [True, True, False, False, False]
    assert (es.best_step, es.best_value, es.stopped) == (20, .3, True)

  def test_min_mode_and_no_patience(self):
    es = early_stopping.EarlyStopping("val/loss", mode="min")
    for s, v in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, 6.0)]:
      es.update(s, {"val/loss": v})
    assert (es.best_step, es.stopped) == (2, False)  # patience 0 never stops

  def test_state_round_trip(self):
    es = early_stopping.EarlyStopping("m", patience=3)
    es.update(1, {"m": 1.0})
    es.update(2, {"m": 0.5})
    other = early_stopping.EarlyStopping("m", patience=3)
    other.restore(json.loads(json.dumps(es.state())))
    assert other.state() == es.state()

  def test_bad_inputs_are_named(self):
    with pytest.raises(KeyError, match="'val/ndcg@10'.*train.select_metric.*val/recall@10"):
      early_stopping.EarlyStopping("val/ndcg@10").update(1, {"val/recall@10": 0.1})
    with pytest.raises(ValueError, match="not finite|is nan"):
      early_stopping.EarlyStopping("m").update(1, {"m": float("nan")})
    with pytest.raises(ValueError, match="mode"):
      early_stopping.EarlyStopping("m", mode="up")
    with pytest.raises(ValueError, match="train.patience=2 needs train.select_metric"):
      config(select_metric="", patience=2)


def test_peak_is_restored_and_training_stops(tmp_path):
  result = train(config(), workdir=str(tmp_path))
  values = [e["val/ndcg@10"] for e in result.evals]
  steps = [e["step"] for e in result.evals]
  best = steps[int(np.argmax(values))]
  assert 2 < best < 20                                       # it peaked early ...
  assert result.selection["best_step"] == best
  assert result.selection["stopped"] and result.step == best + 3 * 2  # ... patience 3
  assert result.step < 60
  # The returned model is the best step's: the same as a run trained exactly that long.
  plain = train(config(num_steps=best, select_metric="", patience=0))
  assert w_of(result.model) == w_of(plain.model)
  assert w_of(result.model) != pytest.approx(w_of(train(config(num_steps=result.step,
                                                               select_metric="",
                                                               patience=0)).model))
  assert (tmp_path / early_stopping.BEST_CHECKPOINTS / str(best)).is_dir()
  # A rerun of the finished run neither trains further nor loses the selection.
  again = train(config(), workdir=str(tmp_path))
  assert again.step == result.step and again.selection == result.selection
  assert w_of(again.model) == w_of(result.model)


def test_without_workdir_the_best_is_kept_in_memory():
  result = train(config())
  plain = train(config(num_steps=result.selection["best_step"], select_metric="",
                       patience=0))
  assert w_of(result.model) == w_of(plain.model)


CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_early_stopping as t
kill_at = int(sys.argv[2])
calls = []
def count(batch):
  calls.append(1)
  if kill_at and len(calls) == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return 1
r = t.train(t.config({config_kwargs}), workdir=sys.argv[1], count_fn=count)
print("RESULT", repr(t.w_of(r.model)), r.step, r.selection["best_step"], r.resumed_from)
"""


def run_child(workdir, kill_at, config_kwargs=""):
  """Trains `config(<config_kwargs>)` in a child process, SIGKILLed at batch `kill_at`."""
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  code = CHILD.format(tests=str(REPO / "tests"), config_kwargs=config_kwargs)
  return subprocess.run([sys.executable, "-c", code, str(workdir), str(kill_at)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_then_rerun_selects_and_stops_like_uninterrupted(tmp_path):
  reference = train(config(), workdir=str(tmp_path / "reference"))
  best = reference.selection["best_step"]
  # Killed two steps after the best evaluation: the best parameters were kept, the
  # checkpoint after the best (every 4 steps) may not be; the rerun replays from the last.
  killed = run_child(tmp_path / "killed", kill_at=best + 2)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert (tmp_path / "killed" / early_stopping.BEST_CHECKPOINTS / str(best)).is_dir()
  resumed = run_child(tmp_path / "killed", kill_at=0)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  line = [l for l in resumed.stdout.splitlines() if l.startswith("RESULT")][0].split()
  w, step, best_step, resumed_from = float(line[1]), int(line[2]), int(line[3]), line[4]
  assert resumed_from != "None" and int(resumed_from) <= best + 2
  assert (step, best_step) == (reference.step, best)
  assert w == w_of(reference.model)  # bit-identical parameters of the best step
