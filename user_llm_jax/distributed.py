"""Several JAX processes as one run: start-up, work done once, evaluation over all hosts.

Start-up. `initialize` calls `jax.distributed.initialize` before any computation. On a
Cloud TPU VM slice every argument may be left out (JAX detects the cluster); elsewhere,
e.g. several CPU processes on one machine, the coordinator address, the number of
processes and this process's id are given as flags or in the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). CPU processes
exchange collectives through gloo (`jax_cpu_collectives_implementation`).

Work done once. `primary_first` runs a step (e.g. preparing a dataset into a shared
directory) on process 0 before the others, so they reuse its output instead of racing
to write the same files.

Evaluation over all hosts. Each process reads its own shard of an evaluation split
(`data.pipeline.make_eval_pipeline`), but the model's parameters live on the mesh of
every process's devices. `HostBatches` assembles the processes' batches into one global
batch for the jitted scorer and gathers the per-example results (and the padding mask)
back to every host, so metrics computed from them equal the single-process ones and
are the same on every process. With one process all of it is the identity.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process joins the run (None: left to JAX's cluster detection).

  Attributes:
    coordinator_address: `host:port` of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's index in [0, num_processes).
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from e


def process_group(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, *,
                  environ: Mapping[str, str] | None = None) -> ProcessGroup:
  """Resolves and checks the process group from flags, else from the environment.

  Args:
    coordinator_address: `host:port` (flag); else `JAX_COORDINATOR_ADDRESS`.
    num_processes: number of processes (flag); else `JAX_NUM_PROCESSES`.
    process_id: this process's index (flag); else `JAX_PROCESS_ID`.
    environ: the environment (default `os.environ`).

  Returns:
    The group; all fields None means cluster auto-detection (Cloud TPU, SLURM, ...).

  Raises:
    ValueError: a partial or inconsistent group, naming the flag or variable.
  """
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(COORDINATOR_ENV) or None
  count = num_processes if num_processes is not None else _env_int(NUM_PROCESSES_ENV, environ)
  index = process_id if process_id is not None else _env_int(PROCESS_ID_ENV, environ)
  given = {"--coordinator_address": address, "--num_processes": count, "--process_id": index}
  if all(v is None for v in given.values()):
    return ProcessGroup()
  missing = [name for name, v in given.items() if v is None]
  if missing:
    raise ValueError(
        f"an explicit process group needs --coordinator_address, --num_processes and "
        f"--process_id (or {COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}); "
        f"missing: {', '.join(missing)}")
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"--coordinator_address={address!r} must be host:port, "
                     "e.g. 127.0.0.1:12345")
  if count < 1:
    raise ValueError(f"--num_processes must be >= 1, got {count}")
  if not 0 <= index < count:
    raise ValueError(f"--process_id={index} must be in [0, --num_processes={count})")
  return ProcessGroup(address, count, index)


def initialize(group: ProcessGroup, *, timeout_seconds: int = 300) -> None:
  """Joins the process group (`jax.distributed.initialize`), before any computation.

  Args:
    group: from `process_group`; empty fields let JAX detect the cluster.
    timeout_seconds: how long to wait for the other processes to join.
  """
  if jax.config.jax_cpu_collectives_implementation is None:
    # Without it, CPU processes would each compute alone and never exchange gradients.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=group.coordinator_address, num_processes=group.num_processes,
      process_id=group.process_id, initialization_timeout=timeout_seconds)


def primary_first(fn: Callable[[], _T], *, name: str) -> _T:
  """Runs `fn` on process 0, then (after a barrier) on every other process.

  For steps that write shared files and reuse them when present (dataset preparation):
  the other processes find the output complete instead of writing it concurrently.

  Args:
    fn: the step; its result is returned on every process.
    name: the barrier's name (unique per call site).
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      return fn()
    finally:
      # Released even when process 0 fails: the others then fail on their own call
      # with the same message instead of waiting forever.
      barrier(name)
  barrier(name)
  return fn()


def barrier(name: str, *, timeout_seconds: int = 3600) -> None:
  """Waits until every process reaches `name`, through the coordination service.

  Not a device collective: CPU (gloo) collectives give up when a peer is more than 30 s
  late, and process 0 may be busy much longer (preparing a dataset).
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:  # Several processes without the coordination service (rare).
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_seconds * 1000)


def _put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """One value onto a sharding that spans several processes (same value on each)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
    data = _put_global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  # Each process fills its own devices' shards from its copy: no cross-process check
  # (device_put would compare the processes' values through a collective per array).
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def device_put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)` that also works across processes.

  With several processes, `jax.device_put` refuses arrays already committed to this
  process's device (e.g. RNG keys) as input for shardings over every process's devices;
  here each process places its own copy of the value (identical on all processes, as a
  model built from the same seed is) on its devices.

  Args:
    tree: a pytree of arrays (the same values on every process).
    shardings: one sharding for every leaf, or a tree of shardings like `tree`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _put_global(x, shardings), tree)
  # `shardings` may be a prefix of `tree` (a sharding where the tree holds a Variable).
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put_global(x, s), sub),
                      shardings, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def _global_mesh(params: Any) -> jax.sharding.Mesh:
  """The mesh of params that span several processes, else one over all devices."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if (isinstance(sharding, jax.sharding.NamedSharding)
        and not getattr(leaf, "is_fully_addressable", True)):
      return sharding.mesh
  return jax.make_mesh((jax.device_count(),), ("batch",),
                       axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class HostBatches:
  """Evaluation over every process's batches at once (identity with one process).

  Build with `HostBatches.for_params(params)`, pass `.params` to the jitted scorer,
  `place` each host batch and `gather` its per-example outputs.

  Attributes:
    params: the parameters, every leaf on `mesh` (process-local leaves replicated).
    mesh: the global device mesh; None with one process.
  """

  params: Any
  mesh: jax.sharding.Mesh | None

  @classmethod
  def for_params(cls, params: Any) -> "HostBatches":
    if jax.process_count() == 1:
      return cls(params, None)
    mesh = _global_mesh(params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def on_mesh(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
      # A host-local value (e.g. popularity counts) is the same on every process.
      return _put_global(x, replicated)

    return cls(jax.tree.map(on_mesh, params), mesh)

  def place(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """This process's batch as its rows of the global batch (rows split over all devices).

    Raises:
      ValueError: the local batch does not split evenly over this process's devices.
    """
    if self.mesh is None:
      return batch
    sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(tuple(self.mesh.axis_names)))
    out = {}
    for key, value in batch.items():
      value = np.asarray(value)
      if value.shape[0] % jax.local_device_count():
        raise ValueError(
            f"evaluation batch of {value.shape[0]} examples per process must be a multiple "
            f"of the {jax.local_device_count()} local devices (config key eval.batch_size)")
      out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out

  def gather(self, *values: Any) -> tuple[Any, ...]:
    """Per-example outputs of the global batch, whole, on every host (None stays None)."""
    if self.mesh is None:
      return values
    return tuple(None if v is None
                 else np.asarray(multihost_utils.process_allgather(v, tiled=True))
                 for v in values)
