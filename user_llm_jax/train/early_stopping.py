"""Best-step selection and early stopping on a validation metric.

The train loop evaluates every `train.eval_every` steps; `EarlyStopping.update` reads the
chosen metric from each evaluation, remembers the best step, and counts evaluations
without improvement. After `patience` such evaluations in a row the run stops
(`patience` 0: never stop early, still track the best step). Its `state()` is JSON and is
checkpointed with the run, so a resumed run stops at the same step and reports the same
best step as an uninterrupted one.

The best step's parameters are kept by `BestParams`: a one-step Orbax store under
`WORKDIR/checkpoints_best` holding the model item alone, the layout
`checkpointing.restore_params` reads. Downstream jobs load from there when it exists
(`runs.Run.checkpoints`), so they see the selected model, not the last one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax.train import checkpointing

BEST_CHECKPOINTS = "checkpoints_best"
MODES = ("max", "min")


@dataclasses.dataclass
class EarlyStopping:
  """Tracks the best evaluation of one metric and decides when to stop.

  Attributes:
    metric: key of the evaluation dict that selects the best step (e.g. 'val/ndcg@10').
    mode: 'max' (higher is better) or 'min'.
    patience: evaluations without improvement after which training stops (0: never).
    min_delta: an evaluation improves only when it beats the best by more than this.
    best_value: the best value seen (None before the first evaluation).
    best_step: the step of `best_value`.
    bad_evals: consecutive evaluations since the last improvement.
    stopped: the patience ran out (a resumed run must not train further).
  """

  metric: str
  mode: str = "max"
  patience: int = 0
  min_delta: float = 0.0
  best_value: float | None = None
  best_step: int | None = None
  bad_evals: int = 0
  stopped: bool = False

  def __post_init__(self):
    if not self.metric:
      raise ValueError("EarlyStopping.metric is empty; name an evaluation metric such as "
                       "'val/ndcg@10'")
    if self.mode not in MODES:
      raise ValueError(f"EarlyStopping.mode={self.mode!r}: expected one of {MODES}")
    if self.patience < 0:
      raise ValueError(f"EarlyStopping.patience={self.patience}: must be >= 0")
    if self.min_delta < 0:
      raise ValueError(f"EarlyStopping.min_delta={self.min_delta}: must be >= 0")

  def _better(self, value: float) -> bool:
    if self.best_value is None:
      return True
    if self.mode == "max":
      return value > self.best_value + self.min_delta
    return value < self.best_value - self.min_delta

  def update(self, step: int, metrics: Mapping[str, float]) -> bool:
    """Records one evaluation; returns True when it is the new best.

    Raises:
      KeyError: the evaluation lacks the metric (names the ones it has).
      ValueError: the metric is not finite (a diverged model cannot be selected).
    """
    if self.metric not in metrics:
      raise KeyError(f"selection metric {self.metric!r} (config key 'train.select_metric') "
                     f"is not among the evaluation's metrics {sorted(metrics)}")
    value = float(metrics[self.metric])
    if not math.isfinite(value):
      raise ValueError(f"selection metric {self.metric!r} is {value} at step {step}")
    if self._better(value):
      self.best_value, self.best_step, self.bad_evals = value, int(step), 0
      return True
    self.bad_evals += 1
    if self.patience and self.bad_evals >= self.patience:
      self.stopped = True
    return False

  def state(self) -> dict[str, Any]:
    """JSON-able state (checkpointed with the run)."""
    return dataclasses.asdict(self)

  def restore(self, state: Mapping[str, Any]) -> None:
    """Takes the progress fields of a saved `state()`; the settings stay this run's."""
    self.best_value = state.get("best_value")
    self.best_step = state.get("best_step")
    self.bad_evals = int(state.get("bad_evals", 0))
    self.stopped = bool(state.get("stopped", False))


class BestParams:
  """The best step's model parameters: on disk under `directory`, else a device copy.

  Args:
    directory: where to keep them (None: a host copy, for runs without a workdir).
  """

  def __init__(self, directory: str | None):
    self.directory = directory
    self._host: tuple[int, Any] | None = None
    self._ckpt = None
    if directory is not None:
      # keep=2: after a kill between a best save and the run's next checkpoint, the replay
      # re-reaches that step (skipped below, same parameters) while the older best stays.
      self._ckpt = checkpointing.Checkpointer(directory, every=1, keep=2)

  @staticmethod
  def _state(model: nnx.Module) -> nnx.State:
    # The tree `restore_params` reads: every variable except RNG streams.
    return nnx.state(model, nnx.Not(nnx.RngState))

  def save(self, step: int, model: nnx.Module) -> None:
    """Keeps `model`'s current parameters as step `step`."""
    if self._ckpt is None:
      # A copy: the train step donates (reuses) the buffers the model holds now.
      self._host = (step, jax.tree.map(jnp.copy, nnx.to_pure_dict(self._state(model))))
      return
    if step in self._ckpt.all_steps():
      return  # A resumed run replaying a step it had already kept: identical parameters.
    self._ckpt.save(step, self._state(model))

  def load(self, step: int, model: nnx.Module) -> None:
    """Puts the parameters kept at `step` back into `model` (in place).

    Raises:
      checkpointing.CheckpointError: they were not kept (e.g. the store was deleted).
    """
    if self._ckpt is None:
      if self._host is None or self._host[0] != step:
        raise checkpointing.CheckpointError(f"best parameters of step {step} were not kept")
      state = self._state(model)
      nnx.replace_by_pure_dict(state, self._host[1])
      nnx.update(model, state)
      return
    if step not in self._ckpt.all_steps():
      raise checkpointing.CheckpointError(
          f"best step {step} is missing from {self.directory} (found {self._ckpt.all_steps()}); "
          "it was deleted after the run recorded it: rerun in a fresh --workdir")
    checkpointing.restore_params(model, self.directory, step=step)

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.close()


def best_dir(workdir: str) -> str:
  """Where a run under `workdir` keeps its best parameters."""
  return os.path.join(workdir, BEST_CHECKPOINTS)
