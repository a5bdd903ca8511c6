"""The generic training loop: steps, logging, periodic eval, checkpoints, preemption.

Any job (encoder pretraining, User-LLM training with any strategy) calls `train(...)` with
its model, a loss function and a repeating Grain iterator. The loop resumes automatically
from the latest checkpoint under `workdir`, and a resumed run reproduces the uninterrupted
one exactly: batches come from the restored iterator position, dropout keys from
(seed, step), and the partial logging accumulators are checkpointed too.

With `train.select_metric` set, every evaluation also feeds `early_stopping.EarlyStopping`:
the best step's parameters are kept (`WORKDIR/checkpoints_best`), the run stops after
`train.patience` evaluations without improvement, and the returned model holds the best
step's parameters. The selection state is checkpointed, so a killed run resumes into the
same best step and stopping point. With `train.ema_decay` the evaluations (and so the
selection and the kept best parameters) read the moving average of the weights instead of
the raw ones; training itself always steps the raw weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx

from user_llm_jax import params as params_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.train import checkpointing
from user_llm_jax.train import early_stopping
from user_llm_jax.train import metrics_writer
from user_llm_jax.train import train_step as train_step_lib

EvalFn = Callable[[nnx.Module], Mapping[str, float]]
CountFn = Callable[[Mapping[str, Any]], int]


@dataclasses.dataclass(frozen=True)
class TrainConfig(train_step_lib.OptimConfig):
  """The `train.*` section of a config: the optimizer's keys (`OptimConfig`, documented
  there: learning_rate, num_steps, warmup, weight_decay, grad_clip, end_lr_fraction,
  lr_mults, ema_decay) plus the loop's.

  Attributes:
    batch_size: global batch size (split over the mesh's batch axes).
    log_every: steps between logged (averaged) training metrics.
    eval_every: steps between evaluations (<= 0: only at the end).
    checkpoint_every: steps between checkpoints (the last step is always saved).
    keep_checkpoints: how many of the latest checkpoints to keep.
    select_metric: evaluation metric that selects the best step, whose parameters the
      run returns (e.g. 'val/ndcg@10'; '': the last step, no selection).
    select_mode: 'max' or 'min': which direction of `select_metric` is better.
    patience: stop after this many evaluations without improvement of `select_metric`
      (0: train all `num_steps`).
  """

  batch_size: int = 128
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  select_metric: str = ""
  select_mode: str = "max"
  patience: int = 0

  def __post_init__(self):
    super().__post_init__()  # validates lr_mults
    if self.select_mode not in early_stopping.MODES:
      raise ValueError(f"train.select_mode={self.select_mode!r}: expected one of "
                       f"{early_stopping.MODES}")
    if self.patience < 0:
      raise ValueError(f"train.patience must be >= 0, got {self.patience}")
    if self.patience and not self.select_metric:
      raise ValueError(f"train.patience={self.patience} needs train.select_metric (the "
                       "validation metric to wait for, e.g. 'val/ndcg@10')")
    if self.ema_decay and not self.select_metric:
      # The average is what is evaluated and kept as the best step's parameters; without a
      # selection the run's checkpoints would hand the raw weights downstream instead.
      raise ValueError(f"train.ema_decay={self.ema_decay} needs train.select_metric (the "
                       "averaged weights are kept as the best step's, e.g. 'val/ndcg@10')")
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
    if self.learning_rate <= 0:
      raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")
    if self.warmup < 0:
      raise ValueError(f"train.warmup must be >= 0, got {self.warmup}")

  def optim(self) -> train_step_lib.OptimConfig:
    """The optimizer's view of this config (itself: a TrainConfig is an OptimConfig)."""
    return self


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    model: the trained model (updated in place; the same object that was passed in).
    optimizer: its optimizer.
    step: the last completed step.
    history: logged training metrics, one dict per log interval (with 'step').
    evals: evaluation metrics, one dict per evaluation (with 'step').
    preempted: True when SIGTERM stopped the run early (a checkpoint was saved).
    resumed_from: the checkpoint step the run resumed from, or None.
    wall_time: seconds spent in this process's loop (compile included).
    total_wall_time: loop seconds of every session of the run: those recorded with the
      checkpoint it resumed from, plus `wall_time` (equal to it for a fresh run; None
      when the checkpoint predates the record).
    trainable_params: number of parameters the optimizer updates.
    total_params: number of parameters of the model.
    eval_seconds: seconds of `wall_time` spent in evaluations.
    selection: the `EarlyStopping.state()` (best step and value, whether it stopped
      early) when `select_metric` is set, else None; `model` then holds the best step.
  """

  model: nnx.Module
  optimizer: nnx.Optimizer
  step: int
  history: list[dict[str, float]]
  evals: list[dict[str, float]]
  preempted: bool
  resumed_from: int | None
  wall_time: float
  trainable_params: int
  total_params: int
  eval_seconds: float = 0.0
  selection: dict[str, Any] | None = None
  total_wall_time: float | None = None


class _Accumulator:
  """Running sums of per-step metrics between two log points (checkpointable)."""

  def __init__(self, state: Mapping[str, Any] | None = None):
    state = dict(state or {})
    self.sums: dict[str, float] = dict(state.get("sums", {}))
    self.count = int(state.get("count", 0))
    self.events = int(state.get("events", 0))

  def add(self, metrics: Mapping[str, Any], events: int) -> None:
    for k, v in metrics.items():
      if k != "finite" and np.ndim(v) == 0:
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    self.events += events

  def means(self) -> dict[str, float]:
    return {k: v / max(self.count, 1) for k, v in self.sums.items()}

  def state(self) -> dict[str, Any]:
    return {"sums": self.sums, "count": self.count, "events": self.events}


def train(model: nnx.Module, loss_fn: train_step_lib.LossFn, cfg: TrainConfig,
          train_iter: Iterator[Mapping[str, Any]], *, mesh: jax.sharding.Mesh,
          rules: sharding_lib.Rules | None = None, seed: int = 0, wrt: Any = nnx.Param,
          workdir: str | None = None, eval_fn: EvalFn | None = None,
          fingerprint: Mapping[str, Any] | None = None, count_fn: CountFn | None = None,
          desc: str = "train", description: Mapping[str, Any] | None = None,
          grad_groups: Mapping[str, Any] | None = None) -> TrainResult:
  """Trains `model` for `cfg.num_steps` steps, resuming from `workdir` if possible.

  Args:
    model: model to train (updated in place).
    loss_fn: `(model, batch) -> (loss, metrics)`; runs inside the jitted step.
    cfg: training hyperparameters.
    train_iter: repeating iterator of host batches (a Grain `DatasetIterator` when the
      position must be checkpointed).
    mesh: device mesh; params and batches are placed by the logical-axis `rules`.
    rules: logical-axis -> mesh-axis rules (None: the active `sharding.axis_rules`).
    seed: seed of the per-step dropout keys.
    wrt: filter of the parameters that train.
    workdir: checkpoints go to `workdir/checkpoints`, TensorBoard files to
      `workdir/tensorboard`; None trains without either.
    eval_fn: `model -> metrics`, run every `cfg.eval_every` steps and at the end (and
      the source of `cfg.select_metric`).
    fingerprint: config facts a checkpoint must match to be resumed.
    count_fn: `batch -> number of real events`, for the events/s readout.
    desc: progress-bar label.
    description: the run's description stored in every checkpoint's metadata
      (`runs.description`: resolved config and model architectures).
    grad_groups: {name: filter} whose gradient norms are logged (`grad_norm/<name>`).

  Returns:
    A `TrainResult`.

  Raises:
    train_step.NonFiniteError: a step produced a non-finite loss or gradient norm.
    checkpointing.CheckpointError: the workdir's checkpoint cannot be resumed.
    ValueError: `cfg.select_metric` is set but there is no `eval_fn`.
  """
  t0 = time.perf_counter()
  stopper = best = None
  if cfg.select_metric:
    if eval_fn is None:
      raise ValueError(f"train.select_metric={cfg.select_metric!r} needs an evaluation "
                       "(a validation split), and this run has none")
    stopper = early_stopping.EarlyStopping(cfg.select_metric, cfg.select_mode, cfg.patience)
    best = early_stopping.BestParams(
        early_stopping.best_dir(workdir) if workdir is not None else None)
    # Where evaluations fall decides the selected step: a resume must evaluate alike.
    fingerprint = {**dict(fingerprint or {}), "selection": {"eval_every": cfg.eval_every}}
  optimizer = nnx.Optimizer(model, train_step_lib.make_tx(cfg.optim()), wrt=wrt)
  trainable = params_lib.count_params(model, wrt)
  total = params_lib.count_params(model, nnx.Param)
  step_fn, state = train_step_lib.TrainStep.create(
      model, optimizer, loss_fn, mesh=mesh, rules=rules, seed=seed, grad_groups=grad_groups)

  ckpt = None
  history: list[dict[str, float]] = []
  evals: list[dict[str, float]] = []
  acc = _Accumulator()
  start, resumed_from = 0, None
  # Loop seconds of earlier sessions (up to the checkpoint resumed from), so that a resumed
  # run reports its whole compute, not only its last session's.
  earlier_seconds: float | None = 0.0
  if workdir is not None:
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=cfg.checkpoint_every,
        keep=cfg.keep_checkpoints, fingerprint=fingerprint, description=description)
    if ckpt.latest_step() is not None:
      data_iter = train_iter if hasattr(train_iter, "get_state") else None
      state, extra, start = ckpt.restore(state, data_iter)
      history = list(extra.get("history", []))
      evals = list(extra.get("evals", []))
      acc = _Accumulator(extra.get("accumulator"))
      earlier_seconds = extra.get("loop_seconds")
      if stopper is not None:
        stopper.restore(extra.get("early_stopping", {}))
      resumed_from = start
      tqdm.tqdm.write(f"[{desc}] resumed from step {start} of {ckpt.directory}",
                      file=sys.stderr)
  writer = metrics_writer.MetricsWriter(
      os.path.join(workdir, "tensorboard") if workdir is not None else None)

  def sync_model():
    nnx.update((model, optimizer), state)

  def save(step: int) -> None:
    if ckpt is None:
      return
    data_iter = train_iter if hasattr(train_iter, "get_state") else None
    extra = {"history": history, "evals": evals, "accumulator": acc.state()}
    if earlier_seconds is not None:
      extra["loop_seconds"] = earlier_seconds + time.perf_counter() - t0
    if stopper is not None:
      extra["early_stopping"] = stopper.state()
    ckpt.save(step, state, data_iter, extra=extra)

  preempted = False
  eval_seconds = 0.0
  step = start
  interval_start = time.perf_counter()
  # Step metrics stay on device until a log step, a checkpoint or the end: fetching them
  # every step would block the host on each step and stall asynchronous dispatch.
  pending: list[tuple[int, Mapping[str, Any], int]] = []

  def flush() -> None:
    """Fetches the pending step metrics; raises on the first non-finite step."""
    nonlocal pending
    fetched = jax.device_get([m for _, m, _ in pending])
    for (i, _, events), metrics in zip(pending, fetched):
      if not bool(metrics["finite"]):
        last = ckpt.latest_step() if ckpt is not None else None
        raise train_step_lib.NonFiniteError(
            f"non-finite training step {i}: loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}; stopping. The update was discarded "
            f"on device, and nothing from step {i} on was saved (last checkpoint: {last}).")
      acc.add(metrics, events)
    pending = []

  try:
    with checkpointing.PreemptionGuard() as guard, tqdm.tqdm(
        total=cfg.num_steps, initial=start, desc=desc, dynamic_ncols=True,
        mininterval=1.0) as bar:
      while step < cfg.num_steps and not (stopper is not None and stopper.stopped):
        try:
          batch = next(train_iter)
        except StopIteration as e:
          raise RuntimeError(
              f"training data ran out at step {step + 1}/{cfg.num_steps}: the training "
              "pipeline must repeat (num_epochs=None)") from e
        state, metrics = step_fn(state, batch, step)
        step += 1
        pending.append((step, metrics, int(count_fn(batch)) if count_fn is not None else 0))
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.num_steps:
          flush()
          now = time.perf_counter()
          means = acc.means()
          means["learning_rate"] = float(train_step_lib.make_schedule(cfg.optim())(step - 1))
          rate = acc.events / max(now - interval_start, 1e-9)
          writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
          if count_fn is not None:
            writer.write_scalars(step, {"train/events_per_sec": rate})
            means["events"] = float(acc.events)  # A count: a resumed run logs the same.
          history.append({"step": step, **means})
          bar.set_postfix(loss=f"{means['loss']:.4f}", ev_s=f"{rate:,.0f}")
          acc = _Accumulator()
          interval_start = now

        if eval_fn is not None and ((cfg.eval_every > 0 and step % cfg.eval_every == 0)
                                    or step == cfg.num_steps):
          flush()
          sync_model()
          if cfg.ema_decay:
            nnx.update(model, train_step_lib.ema_params(optimizer))
          eval_start = time.perf_counter()
          result = {k: float(v) for k, v in eval_fn(model).items()}
          eval_seconds += time.perf_counter() - eval_start
          writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
          evals.append({"step": step, **result})
          tqdm.tqdm.write(f"[{desc}] step {step}: " + ", ".join(
              f"{k}={v:.4f}" for k, v in sorted(result.items())))
          if stopper is not None and stopper.update(step, result):
            best.save(step, model)
          if stopper is not None and stopper.stopped:
            tqdm.tqdm.write(f"[{desc}] stopping early at step {step}: no better "
                            f"{stopper.metric} in {stopper.patience} evaluations (best "
                            f"{stopper.best_value:.4f} at step {stopper.best_step})")

        stopping = stopper is not None and stopper.stopped
        if (guard.requested or step == cfg.num_steps or stopping
            or (ckpt and ckpt.should_save(step))):
          flush()  # nothing non-finite may reach a checkpoint
          save(step)
        if guard.requested:
          preempted = True
          logging.warning("%s at step %d: checkpoint saved, stopping.", guard.signal_name, step)
          tqdm.tqdm.write(f"[{desc}] {guard.signal_name} received: saved step {step}; "
                          "rerun the same command to resume.", file=sys.stderr)
          break
    sync_model()
    if stopper is not None and not preempted and stopper.best_step is not None:
      best.load(stopper.best_step, model)
  finally:
    writer.close()
    if ckpt is not None:
      ckpt.close()
    if best is not None:
      best.close()
  wall_time = time.perf_counter() - t0
  return TrainResult(
      model=model, optimizer=optimizer, step=step, history=history, evals=evals,
      preempted=preempted, resumed_from=resumed_from, wall_time=wall_time,
      trainable_params=trainable, total_params=total, eval_seconds=eval_seconds,
      selection=stopper.state() if stopper is not None else None,
      total_wall_time=None if earlier_seconds is None else earlier_seconds + wall_time)
