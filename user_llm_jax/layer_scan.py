"""Scanned layer stacks: one traced layer body run by a scan over stacked parameters.

A stack of identical layers can be held two ways:

  unrolled   `nnx.List` of L layer modules; parameter names `layers/3/attn/q/kernel`
  stacked    one layer module whose variables carry a leading layer axis [L, ...];
             parameter names `layers/attn/q/kernel` (MaxText's `scan_layers`)

Both compute the same function. The stacked form is traced and compiled once per stack
instead of once per layer (XLA sees a `while` loop), which is what makes deep models compile
in seconds; the unrolled form lets XLA schedule across layer boundaries. Every conversion
between the two lives here: modules (`stack_modules`, `unstack_module`), flat parameter
dicts as checkpoint importers and exporters use them (`stack_params`, `unstack_params`),
and nested pure dicts as Orbax saves them (`unstack_tree`, `stack_tree`).

The layer axis has no logical sharding name (None: replicated over the mesh), so stacked
parameters shard like their per-layer slices. Remat policies (`REMAT_POLICIES`) apply per
layer in both forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)
Carry = TypeVar("Carry")

# What a layer keeps for the backward pass (jax.checkpoint policies).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    # keep matmuls with parameters (no batch dims), recompute attention scores
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Attribute names of the project's layer stacks (decoder `layers`, encoder `blocks`):
# checkpoints hold these per layer whichever form the model runs in.
STACK_NAMES = frozenset({"layers", "blocks"})


def check_remat_policy(name: str, key: str = "remat_policy") -> str:
  """Returns `name` if it is a known policy, else raises a ValueError naming `key`."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"{key}={name!r}: expected one of {sorted(REMAT_POLICIES)}")
  return name


def _with_layer_axis(var: nnx.Variable, value: Any) -> nnx.Variable:
  """`var` holding `value` (one more leading axis), its logical names extended by None."""
  names = var.get_metadata().get("out_sharding")
  if names:
    return var.replace(value, out_sharding=(None, *names))
  return var.replace(value)


def _without_layer_axis(var: nnx.Variable, value: Any) -> nnx.Variable:
  names = var.get_metadata().get("out_sharding")
  if names:
    return var.replace(value, out_sharding=tuple(names[1:]))
  return var.replace(value)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def stack_modules(modules: Sequence[M]) -> M:
  """One module whose variables are those of `modules` stacked on a new leading axis.

  The inputs are not changed. Every module must have the same structure (class, static
  attributes, variable shapes): e.g. LoRA adapters on every layer or on none.

  Raises:
    ValueError: for an empty sequence or modules of different structure (naming the
      first layer that differs).
  """
  if not modules:
    raise ValueError("stack_modules needs at least one module")
  graphdef, first = nnx.split(modules[0])
  states = [first]
  for i, module in enumerate(modules[1:], start=1):
    other_def, state = nnx.split(module)
    if other_def != graphdef:
      raise ValueError(f"layer {i} differs in structure from layer 0 (e.g. an adapter on "
                       "some layers only): such layers cannot be stacked for a scan")
    states.append(state)
  stacked = jax.tree.map(
      lambda *vs: _with_layer_axis(vs[0], jnp.stack([v.get_value() for v in vs])),
      *states, is_leaf=_is_var)
  return nnx.merge(graphdef, stacked)


def layer_count(stacked: nnx.Module) -> int:
  """L, the leading axis of a stacked module's variables."""
  leaves = jax.tree.leaves(nnx.state(stacked))
  if not leaves:
    raise ValueError("a stacked module without variables has no layer count")
  return int(leaves[0].shape[0])


def unstack_module(stacked: nnx.Module, start: int = 0,
                   stop: int | None = None) -> list[nnx.Module]:
  """Independent per-layer modules for layers [start, stop) of a stacked module."""
  stop = layer_count(stacked) if stop is None else stop
  graphdef, state = nnx.split(stacked)
  return [nnx.merge(graphdef, jax.tree.map(lambda v, i=i: _without_layer_axis(v, v[...][i]),
                                           state, is_leaf=_is_var))
          for i in range(start, stop)]


def slice_module(stacked: M, start: int, stop: int) -> M:
  """A stacked module of layers [start, stop) (a view for reading: updates are not shared)."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda v: v.replace(v[...][start:stop]), state,
                                          is_leaf=_is_var))


def _values(tree: Any) -> Any:
  return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_var)


def _rebuild(template: Any, values: Any, strip_axis: bool) -> Any:
  """Variables of `template` holding `values` (per-layer metadata when `strip_axis`)."""
  make = _without_layer_axis if strip_axis else (lambda v, x: v.replace(x))
  return jax.tree.map(make, template, values, is_leaf=_is_var)


def remat(fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
  """`fn(module, *args)` rematerialised under `policy` ('none': `fn` itself).

  Written with `jax.checkpoint` over the module's split state rather than `nnx.remat`, so
  it also runs inside loops traced below the module's own level (the sampler merges the
  model once, outside its decode loop). Non-parameter variables the call changes (dropout
  RNG counts) are written back.
  """
  if check_remat_policy(policy) == "none":
    return fn

  def wrapped(module: nnx.Module, *args: Any) -> Any:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def pure(param_values, rest_values, *args):
      m = nnx.merge(graphdef, _rebuild(params, param_values, False),
                    _rebuild(rest, rest_values, False))
      out = fn(m, *args)
      return out, _values(nnx.state(m, nnx.Not(nnx.Param)))

    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the
    # recomputation with the forward pass (the setting jax recommends there).
    out, new_rest = jax.checkpoint(pure, policy=REMAT_POLICIES[policy], prevent_cse=False)(
        _values(params), _values(rest), *args)
    if jax.tree.leaves(new_rest):
      nnx.update(module, _rebuild(rest, new_rest, False))
    return out

  return wrapped


def scan(stacked: nnx.Module, body: Callable[[nnx.Module, Carry, jax.Array], Carry],
         carry: Carry, *, remat_policy: str = "none", start: int = 0,
         stop: int | None = None) -> Carry:
  """Runs `carry = body(layer_i, carry, i)` for layers i in [start, stop), as one scan.

  The stack is split into its graph and stacked state once; `jax.lax.scan` slices the
  state and the body merges one layer from it (the functional form of `nnx.scan`, which
  also works when the module was merged at an outer trace level, as in the sampler's
  decode loop). Non-parameter variables the body changes (dropout RNG counts) are
  written back into `stacked`.

  Args:
    stacked: the stacked layers (see `stack_modules`).
    body: one layer's step; `i` is the layer's index in the whole stack (int32 scalar),
      e.g. to address a stacked KV cache.
    carry: the loop state (residual stream, caches).
    remat_policy: a `REMAT_POLICIES` name, applied to each layer.
    start, stop: a contiguous range of the stack (default: all layers).

  Returns:
    The final carry.
  """
  total = layer_count(stacked)
  stop = total if stop is None else stop
  if not 0 <= start < stop <= total:
    raise ValueError(f"layer range [{start}, {stop}) is not inside [0, {total})")
  check_remat_policy(remat_policy)
  graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)
  whole = (start, stop) == (0, total)
  take = (lambda tree: _values(tree)) if whole else (
      lambda tree: jax.tree.map(lambda v: v.get_value()[start:stop], tree, is_leaf=_is_var))

  def step(c, xs):
    param_values, rest_values, i = xs
    layer = nnx.merge(graphdef, _rebuild(params, param_values, True),
                      _rebuild(rest, rest_values, True))
    c = body(layer, c, i)
    return c, _values(nnx.state(layer, nnx.Not(nnx.Param)))

  if REMAT_POLICIES[remat_policy] is not None:
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  carry, new_rest = jax.lax.scan(
      step, carry, (take(params), take(rest), jnp.arange(start, stop, dtype=jnp.int32)))
  if jax.tree.leaves(new_rest):
    if not whole:
      new_rest = jax.tree.map(lambda v, x: v.get_value().at[start:stop].set(x), rest,
                              new_rest, is_leaf=_is_var)
    nnx.update(stacked, _rebuild(rest, new_rest, False))
  return carry


# --------------------------------------------------------------- flat parameter dicts


def _layer_key(prefix: str) -> re.Pattern[str]:
  return re.compile(rf"^{re.escape(prefix)}/(\d+)/(.+)$")


def stack_params(params: Mapping[str, Any], prefix: str, num_layers: int, *,
                 source: str = "checkpoint") -> dict[str, Any]:
  """Per-layer names (`layers/3/attn/q/kernel`) -> stacked ones (`layers/attn/q/kernel`).

  Other names pass through. Host arrays are stacked with numpy (no device copy).

  Raises:
    ValueError: naming `source` and the tensor, for a layer index out of range, a layer
      missing a tensor the others have, or per-layer shapes that differ.
  """
  pattern = _layer_key(prefix)
  out: dict[str, Any] = {}
  per_layer: dict[str, dict[int, Any]] = {}
  for key, value in params.items():
    match = pattern.match(key)
    if match is None:
      out[key] = value
      continue
    index, rest = int(match.group(1)), match.group(2)
    if not 0 <= index < num_layers:
      raise ValueError(f"{source}: parameter {key!r}: layer {index} out of range "
                       f"[0, {num_layers})")
    per_layer.setdefault(rest, {})[index] = value
  for rest, layers in sorted(per_layer.items()):
    missing = sorted(set(range(num_layers)) - set(layers))
    if missing:
      raise ValueError(f"{source}: parameter {prefix}/{missing[0]}/{rest!r} is missing")
    shapes = {tuple(np.shape(v)) for v in layers.values()}
    if len(shapes) > 1:
      raise ValueError(f"{source}: parameter {prefix}/<i>/{rest} has different shapes "
                       f"across layers {sorted(shapes)}")
    values = [layers[i] for i in range(num_layers)]
    stack = jnp.stack if any(isinstance(v, jax.Array) for v in values) else np.stack
    out[f"{prefix}/{rest}"] = stack(values)
  return out


def unstack_params(params: Mapping[str, Any], prefix: str,
                   names: Sequence[str] | None = None) -> dict[str, Any]:
  """Stacked names (`layers/attn/q/kernel` [L,...]) -> per-layer ones (`layers/3/...`).

  Args:
    params: flat {name: array}.
    prefix: the stack's name (`layers`).
    names: which keys under `prefix/` are stacked (default: all of them); a model with
      unrolled layers has none (its keys carry an index already and pass through).
  """
  out: dict[str, Any] = {}
  indexed = _layer_key(prefix)
  for key, value in params.items():
    stacked = key.startswith(prefix + "/") and not indexed.match(key)
    if names is not None:
      stacked = stacked and key in names
    if not stacked:
      out[key] = value
      continue
    rest = key[len(prefix) + 1:]
    for i in range(value.shape[0]):
      out[f"{prefix}/{i}/{rest}"] = value[i]
  return out


# ------------------------------------------------------------ nested pure dicts (Orbax)


def _take(leaf: Any, i: int) -> Any:
  """Layer i of a stacked leaf: an array, or an abstract one (an Orbax restore target)."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh,
                                            jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def _stack(leaves: Sequence[Any], like: Any) -> Any:
  """Stacks per-layer arrays, placed like `like` (the stacked target) when it is placed."""
  out = jnp.stack(leaves)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(out, sharding) if sharding is not None else out


def _is_stacked_node(node: Any) -> bool:
  """A dict of named (not indexed) children: a stacked layer's variables."""
  return isinstance(node, Mapping) and bool(node) and all(
      isinstance(k, str) and not k.isdigit() for k in node)


def unstack_tree(tree: Mapping[Any, Any],
                 names: frozenset[str] = STACK_NAMES) -> dict[Any, Any]:
  """A nested pure dict with every stacked stack under a key in `names` unrolled.

  Stacks are found by their children: a stacked stack has named children (`attn`, ...)
  where an unrolled one has layer indices (0, 1, ...). Optimizer moments mirror the
  parameters, so a whole train state converts the same way.
  """
  out: dict[Any, Any] = {}
  for key, node in tree.items():
    if key in names and _is_stacked_node(node):
      leaves = jax.tree.leaves(node)
      count = leaves[0].shape[0] if leaves else 0
      out[key] = {i: jax.tree.map(lambda a, i=i: _take(a, i), node) for i in range(count)}
    elif isinstance(node, Mapping):
      out[key] = unstack_tree(node, names)
    else:
      out[key] = node
  return out


def stack_tree(tree: Mapping[Any, Any], like: Mapping[Any, Any]) -> dict[Any, Any]:
  """Inverse of `unstack_tree`: restacks what is stacked in `like` (same structure).

  Restacked arrays are placed with the shardings of `like`'s leaves when they have them.
  """
  out: dict[Any, Any] = {}
  for key, node in tree.items():
    target = like.get(key) if isinstance(like, Mapping) else None
    if (isinstance(node, Mapping) and _is_stacked_node(target)
        and not _is_stacked_node(node) and node):
      layers = [node[i] for i in sorted(node, key=int)]
      out[key] = jax.tree.map(lambda t, *xs: _stack(xs, t), target, *layers)
    elif isinstance(node, Mapping) and isinstance(target, Mapping):
      out[key] = stack_tree(node, target)
    else:
      out[key] = node
  return out
