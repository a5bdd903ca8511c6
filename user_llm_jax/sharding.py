"""Device meshes, logical-axis rules, and the context that makes a set of rules active.

Params and activations are annotated with *logical* axis names (what a dimension means);
rules (config data: `config.mesh.rules`) map them to the physical mesh axes `data`, `fsdp`
and `tensor`. Changing the parallelism layout is a config change.

Parameter axes (metadata of every `nnx.Param`, written by `partitioned`):
  embed        model width D                               -> 'fsdp'
  mlp          feed-forward hidden width F                 -> 'tensor'
  heads        attention query heads N                     -> 'tensor'
  kv_heads     attention key/value heads K                 -> 'tensor'
  head_dim     per-head width H                            -> None
  vocab        token / item vocabulary V                   -> 'tensor'
  latents      Perceiver latents Q                         -> None
  lora_rank    LoRA rank R                                 -> None
  features     encoder feature / tower widths              -> None
  length       learned position tables                     -> None

Activation axes (`with_logical_constraint` at block boundaries). They are separate names
(MaxText's `activation_embed` vs `embed`) so that a layout can shard weights one way and
activations another; the defaults reproduce the layout the library has always used:
  activation_batch    examples in a batch                  -> ('data', 'fsdp')
  activation_length   text positions or user events        -> None
  activation_embed    residual-stream width D              -> None (FSDP shards the weights'
                                                              D, the batch takes fsdp here)
  activation_mlp      feed-forward hidden width F          -> 'tensor'
  activation_heads    attention heads N                    -> 'tensor'
  activation_kv       per-head width H of keys / values    -> None
  activation_vocab    logits over the vocabulary V         -> 'tensor'
  activation_latents  Perceiver latents Q                  -> None
  batch               host input batches (as activation_batch; kept for callers that
                      place inputs by this name)          -> ('data', 'fsdp')

The rules context. A job makes its rules active once, around everything it builds, places,
traces and runs:

    with sharding.axis_rules(config.mesh.rules):        # () -> DEFAULT_RULES
      ...

Entries override `DEFAULT_RULES` by name (a config lists only what it changes). Everything
that is not handed `rules=` explicitly reads the active rules: parameter placement
(`shard_model`, `model_shardings`, `logical_sharding`, the train step, checkpoint restore,
`llm.model.create_sharded`) and activation constraints (`with_logical_constraint`) alike.
An explicit `rules=` argument still wins (it is merged over `DEFAULT_RULES` the same way).
The table is stored in Flax's own context (`nnx.logical_axis_rules`), so Flax utilities
that read logical rules see it too (they map names one by one, without this module's rule
that a mesh axis is used once per array: place parameters with `model_shardings`).

Activation constraints read the rules when a function is *traced*. `jax.jit`'s cache does not
key on them: a jitted function traced under one set of rules keeps them. `TrainStep` enters
its rules around every call for that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # Parameter axes.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("latents", None),
    ("lora_rank", None),
    ("features", None),
    ("length", None),
    # Input batches placed from the host.
    ("batch", ("data", "fsdp")),
    # Activation axes.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("activation_latents", None),
)

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

# Activation layouts at block boundaries, named by their axes (B batch, T text positions or
# E user events, D width, F feed-forward width, Q latents, N heads, H head width, V vocab).
ACT_BTD = ("activation_batch", "activation_length", "activation_embed")
ACT_BTF = ("activation_batch", "activation_length", "activation_mlp")
ACT_BTV = ("activation_batch", "activation_length", "activation_vocab")
ACT_BQD = ("activation_batch", "activation_latents", "activation_embed")
ACT_BENH = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
ACT_BE = ("activation_batch", "activation_length")


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


def _mesh_axes(target: Any, where: str) -> MeshAxes:
  """A rule's target as None, one mesh axis name or a tuple of them."""
  if target is None or isinstance(target, str):
    return target
  if isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target):
    return tuple(target) or None
  raise ValueError(f"{where}: mesh axes must be None, a mesh axis name or a sequence of "
                   f"them, got {target!r}")


def normalize_rules(rules: Iterable[Sequence[Any]] | None, *,
                    where: str = "mesh.rules") -> Rules:
  """`DEFAULT_RULES` with `rules`' entries substituted by name (() or None: the defaults).

  Args:
    rules: (logical axis, mesh axes) pairs, e.g. `config.mesh.rules`.
    where: what to name in error messages (the config key).

  Returns:
    A complete rules table, in the order of `DEFAULT_RULES`.

  Raises:
    ValueError: naming the entry, for a malformed pair or an unknown logical axis.
  """
  table = dict(DEFAULT_RULES)
  for i, entry in enumerate(rules or ()):
    at = f"{where}[{i}]"
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
      raise ValueError(f"{at}: expected a (logical axis, mesh axes) pair, got {entry!r}")
    name, target = entry
    if name not in table:
      raise ValueError(f"{at}: unknown logical axis {name!r}; known: {list(LOGICAL_AXES)}")
    table[name] = _mesh_axes(target, at)
  return tuple(table.items())


def active_rules() -> Rules:
  """The rules of the innermost `axis_rules` context (`DEFAULT_RULES` outside any)."""
  return normalize_rules(linen.get_logical_axis_rules(), where="active logical-axis rules")


def _resolve(rules: Iterable[Sequence[Any]] | None) -> Rules:
  return active_rules() if rules is None else normalize_rules(rules, where="rules")


@contextlib.contextmanager
def axis_rules(rules: Iterable[Sequence[Any]] | None,
               mesh: jax.sharding.Mesh | None = None) -> Iterator[Rules]:
  """Makes `rules` (merged over `DEFAULT_RULES`) the active logical-axis rules.

  Args:
    rules: (logical axis, mesh axes) pairs overriding the defaults, e.g.
      `config.mesh.rules`; () or None keeps the defaults.
    mesh: also make this mesh current (`jax.set_mesh`) for the duration.

  Yields:
    The complete active rules table.
  """
  table = normalize_rules(rules)
  with contextlib.ExitStack() as stack:
    stack.enter_context(nnx.logical_axis_rules(table))
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    yield table


def partitioned(init: nnx.Initializer, names: Sequence[str | None]) -> nnx.Initializer:
  """Annotates an initializer with logical axis names; placement happens later on a mesh.

  No eager sharding: a model builds on one host, with or without a mesh, and is placed by
  the active rules (`shard_model`, or a jitted init with `model_shardings` as out_shardings).

  Raises:
    ValueError: for a name that no rule knows (a typo would otherwise replicate silently).
  """
  names = tuple(names)
  unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"parameter axes {names}: unknown logical axes {unknown}; "
                     f"known: {list(LOGICAL_AXES)}")
  return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_to_mesh_spec(logical: Sequence[str | None],
                         rules: Iterable[Sequence[Any]] | None = None,
                         ) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec, never using a mesh axis twice.

  Args:
    logical: one logical name (or None) per array axis.
    rules: explicit rules; None reads the active ones (`axis_rules`).

  Raises:
    KeyError: for a logical name without a rule.
  """
  table = dict(_resolve(rules))
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
                     rules: Iterable[Sequence[Any]] | None = None,
                     ) -> jax.sharding.NamedSharding:
  """The NamedSharding of an array whose axes have these logical names."""
  return jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(logical, rules))


def variable_sharding(var: nnx.Variable, mesh: jax.sharding.Mesh,
                      rules: Iterable[Sequence[Any]] | None = None,
                      ) -> jax.sharding.NamedSharding:
  """A variable's NamedSharding from its logical `out_sharding` metadata.

  Variables without names, or whose names do not match their rank (e.g. optimizer state
  that changed shape), are replicated.
  """
  names = var.get_metadata().get("out_sharding")
  if names is None or len(names) != np.ndim(var.get_value()):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return logical_sharding(mesh, names, rules)


def model_shardings(model: nnx.Module | Any, mesh: jax.sharding.Mesh,
                    rules: Iterable[Sequence[Any]] | None = None) -> Any:
  """NamedShardings for every variable of a model (or of an `nnx.State` of variables).

  Optimizer moments carry their parameter's names, so they shard like the parameter.
  """
  state = model if isinstance(model, nnx.State) else nnx.state(model)
  table = _resolve(rules)
  return jax.tree.map(lambda var: variable_sharding(var, mesh, table), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                rules: Iterable[Sequence[Any]] | None = None) -> None:
  """Places every variable of `model` on `mesh` according to the rules (in place)."""
  state = nnx.state(model)
  shardings = model_shardings(state, mesh, rules)
  values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, jax.device_put(values, shardings))


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None],
                            rules: Iterable[Sequence[Any]] | None = None) -> jax.Array:
  """Constrains an activation's sharding inside jit when a mesh is active; else no-op.

  Args:
    x: the activation.
    logical: one activation axis name (`activation_*`) or None per axis of `x`.
    rules: explicit rules; None reads the active ones (`axis_rules`) at trace time.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, rules))
