"""Device meshes and logical-axis sharding rules.

Params and activations are annotated with *logical* axis names (what a dimension means);
the rules below (config data, overridable per experiment) map them to the physical mesh
axes `data`, `fsdp` and `tensor`. Changing the parallelism layout is a config change.

Logical axes used across the library:
  batch        examples in a batch                         -> ('data', 'fsdp')
  length       sequence positions (text or events)         -> None
  embed        model width D                               -> 'fsdp'
  mlp          feed-forward hidden width F                 -> 'tensor'
  heads        attention query heads N                     -> 'tensor'
  kv_heads     attention key/value heads K                 -> 'tensor'
  head_dim     per-head width H                            -> None
  vocab        token / item vocabulary V                   -> 'tensor'
  latents      Perceiver latents Q                         -> None
  lora_rank    LoRA rank R                                 -> None
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("latents", None),
    ("lora_rank", None),
    ("features", None),
)


class MeshError(ValueError):
  """The requested mesh does not fit the available devices (a config error)."""


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh with Auto axis types (the library relies on automatic sharding).

  Args:
    shape: size of each mesh axis; -1 in one position takes the remaining devices.
    axis_names: names of the mesh axes, default ('data', 'fsdp', 'tensor').
    devices: devices to use (default: all).

  Returns:
    A `jax.sharding.Mesh`.

  Raises:
    MeshError: if the shape does not match the axis names or the number of devices.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise MeshError(f"mesh.shape {shape} does not match axis names {tuple(axis_names)}")
  if shape.count(-1) > 1:
    raise MeshError(f"mesh.shape {shape}: at most one axis may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise MeshError(f"mesh.shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise MeshError(
        f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
        f"but {len(devices)} are available (on CPU, set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
  return jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names),
      devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None],
                         rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES,
                         ) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec, never using a mesh axis twice."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return jax.sharding.PartitionSpec(*out)


def logical_sharding(mesh: jax.sharding.Mesh, logical: Sequence[str | None],
                     rules=DEFAULT_RULES) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(logical, rules))


def model_shardings(model: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every variable of `model`, from its `sharding_names` metadata.

  Variables created with `nnx.with_partitioning(init, (logical names...))` (stored as
  `out_sharding` metadata) are sharded by the rules; others are replicated.
  """
  state = nnx.state(model)

  def spec(var):
    names = var.get_metadata().get("out_sharding")
    if names is None:
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return logical_sharding(mesh, names, rules)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> None:
  """Places every variable of `model` on `mesh` according to the rules (in place)."""
  state = nnx.state(model)
  shardings = model_shardings(model, mesh, rules)
  values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, jax.device_put(values, shardings))


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None],
                            rules=DEFAULT_RULES) -> jax.Array:
  """Constrains an activation's sharding inside jit when a mesh is active; else no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, rules))
