"""The parameters' moving average (`train.ema_decay`): the update rule, what the trainer
evaluates and keeps, and a SIGKILL + rerun with the average in the optimizer state."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import test_early_stopping as es
from user_llm_jax.train import early_stopping
from user_llm_jax.train import train_step as train_step_lib

DECAY = 0.8


def test_track_ema_is_the_hand_computed_average():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.sgd(0.1), train_step_lib.track_ema(DECAY))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((3, 2))

  def loss(m):
    return jnp.mean((m(x) - 1.0) ** 2)

  kernels = [np.asarray(model.kernel[...])]
  for _ in range(3):
    optimizer.update(model, nnx.grad(loss)(model))
    kernels.append(np.asarray(model.kernel[...]))
  expected = kernels[0]
  for k in kernels[1:]:
    expected = DECAY * expected + (1 - DECAY) * k
  ema = train_step_lib.ema_params(optimizer)
  np.testing.assert_allclose(ema["kernel"], expected, rtol=1e-6)
  assert not np.allclose(ema["kernel"], kernels[-1])   # not just the raw weights
  # The updates pass through: the raw weights are what SGD alone gives.
  plain = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  plain_opt = nnx.Optimizer(plain, optax.sgd(0.1), wrt=nnx.Param)
  for _ in range(3):
    plain_opt.update(plain, nnx.grad(loss)(plain))
  np.testing.assert_array_equal(plain.kernel[...], model.kernel[...])


def test_ema_params_without_the_average_is_an_error():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match="ema_decay"):
    train_step_lib.ema_params(optimizer)


def test_bad_decays_are_named():
  with pytest.raises(ValueError, match="train.ema_decay must be in"):
    es.config(ema_decay=1.0)
  with pytest.raises(ValueError, match="train.ema_decay must be in"):
    es.config(ema_decay=-0.1)
  with pytest.raises(ValueError, match="train.ema_decay=0.9 needs train.select_metric"):
    es.config(ema_decay=0.9, select_metric="", patience=0)


def raw_trajectory(steps: int) -> list[float]:
  """The walker's raw weight after 0..steps steps (training without the average).

  The loss logs the weight it was computed at, i.e. before its step's update, so step t+1's
  log holds the weight after t steps.
  """
  result = es.train(es.config(num_steps=steps + 1, select_metric="", patience=0, log_every=1))
  return [h["w"] for h in result.history]


def test_evaluations_read_the_average_and_keep_it_as_the_best(tmp_path):
  result = es.train(es.config(ema_decay=DECAY, log_every=1), workdir=str(tmp_path))
  raw = raw_trajectory(result.step)
  # Training itself is unchanged: the logged (raw) weights are those of a run without it.
  np.testing.assert_array_equal([h["w"] for h in result.history], raw[:-1])
  average, averages = raw[0], [raw[0]]
  for w in raw[1:]:
    average = DECAY * average + (1 - DECAY) * w
    averages.append(average)
  for e in result.evals:
    assert e["val/ndcg@10"] == pytest.approx(es.peaked_eval_of(averages[e["step"]]), abs=1e-6)
  best = result.selection["best_step"]
  # The average lags the raw walk, so it peaks later than the raw weights would.
  assert best > es.train(es.config()).selection["best_step"]
  assert es.w_of(result.model) == pytest.approx(averages[best], rel=1e-6)
  assert (tmp_path / early_stopping.BEST_CHECKPOINTS / str(best)).is_dir()


def test_sigkill_then_rerun_continues_the_average(tmp_path):
  reference = es.train(es.config(ema_decay=DECAY), workdir=str(tmp_path / "reference"))
  best = reference.selection["best_step"]
  # Killed between checkpoints (every 4 steps) before the best evaluation: the rerun must
  # resume the average from the checkpointed optimizer state (a fresh average would lag
  # differently) and replay the lost steps to select the same step with the same weights.
  assert best > 8
  killed = es.run_child(tmp_path / "killed", kill_at=best - 3,
                        config_kwargs=f"ema_decay={DECAY}")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  resumed = es.run_child(tmp_path / "killed", kill_at=0, config_kwargs=f"ema_decay={DECAY}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  line = [l for l in resumed.stdout.splitlines() if l.startswith("RESULT")][0].split()
  w, step, best_step, resumed_from = float(line[1]), int(line[2]), int(line[3]), line[4]
  assert resumed_from != "None" and int(resumed_from) < best
  assert (step, best_step) == (reference.step, best)
  assert w == es.w_of(reference.model)  # bit-identical averaged parameters
