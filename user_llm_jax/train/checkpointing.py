"""Orbax checkpointing of model + optimizer state + Grain iterator, with preemption support.

One `Checkpointer` saves, as a single Orbax `Composite` per step, named items:
  model  the model's variables (`StandardSave`, restored onto the current mesh's
         shardings, so a run may resume on a different mesh shape);
  opt    the optimizer state (step count, Adam moments), present for training states;
  data   the Grain iterator position (Grain's format; `iterator_state` also resumes it
         under a different number of processes);
  meta   JSON: a fingerprint of the config that must match to resume, the run's
         description (resolved config, model architectures) and the training history the
         caller wants to survive a restart.

Two ways back, as MaxText separates `load_full_state_path` from `load_parameters_path`:
`Checkpointer.restore` resumes a run (model + opt + data, fingerprint checked);
`restore_params` loads only the `model` item of a finished run into a freshly built module,
onto that module's shardings (no optimizer moments read, every mismatch named).
Saving is synchronous (the small encoder saves in milliseconds and a SIGKILL can then
never leave a half-written step behind as the latest; Orbax also writes each step to a
temporary directory and renames it into place).

`PreemptionGuard` turns SIGTERM (what Cloud TPU maintenance and most schedulers send)
into a flag the train loop checks at step boundaries: it saves and exits cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import layer_scan
from user_llm_jax import storage
from user_llm_jax.train import iterator_state


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or incompatible with the current config."""


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of a pytree of arrays (Orbax restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two fingerprints: `config.differing_paths` (the
  same rule as every other fingerprint comparison), each with both sides' values."""
  def at(tree: Any, path: tuple) -> Any:
    for key in path:
      if not isinstance(tree, Mapping) or key not in tree:
        return "<absent>"
      tree = tree[key]
    return tree
  return [f"{config_lib.dotted(path)}: checkpoint has {at(saved, path)!r}, config has "
          f"{at(current, path)!r}" for path in config_lib.differing_paths(saved, current)]


def _jsonable(obj: Any) -> Any:
  """Round-trips through JSON so tuples/lists compare equal after a restore."""
  return json.loads(json.dumps(obj, default=str))


MODEL, OPT, DATA, META = "model", "opt", "data", "meta"


def _named_items(pure: Mapping[Any, Any]) -> dict[str, Any]:
  """Pure dict of a `(model, optimizer)` state -> {'model': ..., 'opt': ...}.

  A state of a single module (no optimizer) is the `model` item alone.
  """
  if set(pure) == {0, 1}:
    return {MODEL: pure[0], OPT: pure[1]}
  return {MODEL: dict(pure)}


def _unnamed(items: Mapping[str, Any], like: Mapping[Any, Any]) -> dict[Any, Any]:
  """Inverse of `_named_items`, keyed like the pure dict `like`."""
  if set(like) == {0, 1}:
    return {0: items[MODEL], 1: items[OPT]}
  return dict(items[MODEL])


class Checkpointer:
  """Latest-N checkpoints of one run under `directory`, saved every `every` steps.

  Args:
    directory: where step directories are written (created if absent).
    every: save when `step % every == 0` (and whenever `save(..., force=True)`).
    keep: how many of the latest checkpoints to keep.
    fingerprint: JSON-able description of everything that must not change between a run
      and its resumption (`config.fingerprint`: data, model, seed, schedule).
    description: JSON-able description of the run saved with every step (its resolved
      config and model architectures), so that the checkpoint explains itself.
  """

  def __init__(self, directory: str, *, every: int, keep: int = 3,
               fingerprint: Mapping[str, Any] | None = None,
               description: Mapping[str, Any] | None = None):
    if every <= 0:
      raise ValueError(f"checkpoint interval must be positive, got {every}")
    self.directory = storage.absolute(directory)
    self.every = every
    self.fingerprint = _jsonable(dict(fingerprint or {}))
    self.description = _jsonable(dict(description or {}))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state: nnx.State, data_iter: Any = None,
           extra: Mapping[str, Any] | None = None) -> None:
    """Saves `state` (and the iterator position and `extra`) as step `step`."""
    # Layer stacks are saved per layer, so scanned and unrolled runs resume each other.
    pure = layer_scan.unstack_tree(nnx.to_pure_dict(state))
    items = {name: ocp.args.StandardSave(tree) for name, tree in _named_items(pure).items()}
    items[META] = ocp.args.JsonSave({"fingerprint": self.fingerprint,
                                     "description": self.description,
                                     "extra": _jsonable(dict(extra or {}))})
    if data_iter is not None:
      items[DATA] = iterator_state.SaveAnyCount(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step` (fingerprint and extra)."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          **{META: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax raises many types for unreadable directories.
      raise CheckpointError(
          f"checkpoint {self._step_path(step)} is missing or unreadable "
          f"({type(e).__name__}: {e}); delete it to start over") from e
    return dict(out[META])

  def restore(self, state: nnx.State, data_iter: Any = None,
              step: int | None = None) -> tuple[nnx.State, dict[str, Any], int]:
    """Restores checkpoint `step` (default: latest) onto the shardings of `state`.

    Args:
      state: a state of the current model/optimizer (its shapes and shardings are the
        restore target; it is updated in place and returned).
      data_iter: the Grain iterator to reposition (in place), or None.
      step: which step; None for the latest.

    Returns:
      (state, extra dict saved with the checkpoint, restored step).

    Raises:
      CheckpointError: no such checkpoint, unreadable, or saved by an incompatible config.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}")
    elif step not in self.all_steps():
      raise CheckpointError(
          f"checkpoint {self._step_path(step)} not found; available steps: {self.all_steps()}")
    meta = self.read_meta(step)
    diffs = _diff(meta.get("fingerprint", {}), self.fingerprint)
    if diffs:
      raise CheckpointError(
          f"workdir checkpoint {self._step_path(step)} was written by an incompatible config ("
          + "; ".join(diffs[:5]) + "); use a fresh --workdir or restore the original config")
    pure = nnx.to_pure_dict(state)
    items = {name: ocp.args.StandardRestore(layer_scan.unstack_tree(_abstract(tree)))
             for name, tree in _named_items(pure).items()}
    if data_iter is not None:
      # Also resumes a position saved by a different number of processes.
      items[DATA] = iterator_state.RestoreAnyCount(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Shape mismatches, truncated files, missing items.
      raise CheckpointError(
          f"cannot restore checkpoint {self._step_path(step)} "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
          "it is corrupt or from a different model; delete it or use a fresh --workdir") from e
    restored = {name: layer_scan.stack_tree(restored[name], like)
                for name, like in _named_items(pure).items()}
    nnx.replace_by_pure_dict(state, _unnamed(restored, pure))
    return state, dict(meta.get("extra", {})), step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _shape_mismatches(target: Any, saved: Any, path: str = "") -> list[str]:
  """Paths where the saved `model` item's tree or shapes differ from the target module's."""
  if not isinstance(target, Mapping):
    shape = tuple(getattr(saved, "shape", ()) or ())
    return [] if shape == tuple(np.shape(target)) else [
        f"{path}: checkpoint has shape {shape}, the model expects {tuple(np.shape(target))}"]
  if not isinstance(saved, Mapping):
    return [f"{path}: checkpoint has a value where the model has a module"]
  out = [f"{path}/{k}: missing from the checkpoint" for k in target if str(k) not in saved
         and k not in saved]
  out += [f"{path}/{k}: in the checkpoint, not in the model" for k in saved
          if k not in target and not any(str(t) == str(k) for t in target)]
  for key, sub in target.items():
    found = saved.get(key, saved.get(str(key)))
    if found is not None:
      out += _shape_mismatches(sub, found, f"{path}/{key}")
  return out


def latest_step(directory: str) -> int | None:
  """The newest step of a checkpoint directory (None when it holds none)."""
  if not storage.isdir(directory):
    return None
  with ocp.CheckpointManager(storage.absolute(directory)) as manager:
    return manager.latest_step()


def read_description(directory: str, step: int | None = None) -> dict[str, Any]:
  """The run description (`Checkpointer(description=...)`) saved with a checkpoint step."""
  directory = storage.absolute(directory)
  step = latest_step(directory) if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory!r}")
  with ocp.CheckpointManager(directory) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  return dict(dict(meta[META]).get("description", {}))


def restore_params(module: nnx.Module, directory: str, *, step: int | None = None) -> int:
  """Loads the `model` item of a checkpoint into `module`, onto its current shardings.

  Only the model's variables are read (not the optimizer moments nor the data position),
  into a target built from `module` itself, so a model trained on one mesh loads onto
  another. RNG-stream variables are left as the module has them.

  Args:
    module: a module of the architecture the checkpoint was written by.
    directory: the checkpoint directory (`WORKDIR/checkpoints`).
    step: the step to load (default: the latest).

  Returns:
    The restored step.

  Raises:
    CheckpointError: no checkpoint, or a tree/shape mismatch (the first few named).
  """
  directory = storage.absolute(directory)
  if not storage.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  step = latest_step(directory) if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory!r}")
  # Read the `model` item alone (a StandardCheckpointer over its directory), so nothing
  # else of the step is touched.
  item = os.path.join(directory, str(step), MODEL)
  if not storage.isdir(item):
    raise CheckpointError(f"checkpoint {directory}/{step} has no '{MODEL}' item")
  state = nnx.state(module, nnx.Not(nnx.RngState))
  stacked = nnx.to_pure_dict(state)
  pure = layer_scan.unstack_tree(stacked)  # checkpoints hold layer stacks per layer
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(item)
    saved = getattr(saved, "item_metadata", saved)
    if saved is not None:
      problems = _shape_mismatches(pure, dict(saved))
      if problems:
        raise CheckpointError(
            f"checkpoint {directory}/{step} was written by a different model: "
            + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                         if len(problems) > 5 else ""))
    restored = {MODEL: layer_scan.stack_tree(ckptr.restore(item, _abstract(pure)), stacked)}
  nnx.replace_by_pure_dict(state, restored[MODEL])
  nnx.update(module, state)
  return int(step)


class PreemptionGuard:
  """Context manager: SIGTERM sets `requested` instead of killing the process.

  The train loop polls `requested` after every step, saves a checkpoint and returns.
  Only installs the handler from the main thread (signal handlers cannot be set
  elsewhere); the previous handler is restored on exit.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.requested = False
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
