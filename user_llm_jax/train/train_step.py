"""The optimizer and the one jitted train step shared by every training job.

A job supplies a model and a loss function `loss_fn(model, batch) -> (loss, metrics)`;
which parameters train (Full / LoRA / Enc / Proj) is the `wrt` filter handed to
`nnx.Optimizer`, never a second code path. The step is a pure function of
`(state, batch, step)`: the model + optimizer state go in and come out (donated), and the
dropout keys are derived from `(seed, step)` rather than from consumed RNG state, so a run
resumed from a checkpoint replays exactly the same randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from user_llm_jax import distributed
from user_llm_jax import params as params_lib
from user_llm_jax import sharding as sharding_lib

Batch = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyperparameters (the `train.*` keys that shape the update).

  Attributes:
    learning_rate: peak learning rate of the warmup-cosine schedule.
    num_steps: total number of optimizer steps (length of the cosine decay).
    warmup: linear warmup steps from 0 to `learning_rate`.
    weight_decay: decoupled AdamW weight decay.
    grad_clip: global-norm gradient clipping threshold (<= 0 disables clipping).
    end_lr_fraction: final learning rate as a fraction of the peak.
    lr_mults: `(regex, multiplier)` pairs (big_vision's `lr_mults`): a parameter whose
      '/'-joined path matches a regex (`re.search`, first match wins) gets its learning
      rate multiplied. Zero-initialised tanh gates need this: Adam moves a parameter by
      about the learning rate per step, so a gate at lr 1e-4 is still ~0.01 after 100
      steps and the whole bridge behind it barely receives gradient.
    ema_decay: decay of an exponential moving average of the trained parameters (Polyak
      averaging; 0 disables it). The average lives in the optimizer state (`EmaState`,
      so it is checkpointed, resumed and sharded like Adam's moments), and evaluations
      read it instead of the raw weights (`ema_params`); e.g. 0.99 averages over roughly
      the last 100 steps.
  """

  learning_rate: float = 1e-3
  num_steps: int = 1000
  warmup: int = 100
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  end_lr_fraction: float = 0.0
  lr_mults: tuple[tuple[str, float], ...] = ()
  ema_decay: float = 0.0

  def __post_init__(self):
    if isinstance(self.ema_decay, bool) or not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
    for rule in self.lr_mults:
      if (not isinstance(rule, (tuple, list)) or len(rule) != 2
          or not isinstance(rule[0], str) or isinstance(rule[1], bool)
          or not isinstance(rule[1], (int, float)) or not rule[1] > 0):
        raise ValueError(f"train.lr_mults entries must be (regex, multiplier > 0), got {rule!r}")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise ValueError(f"train.lr_mults regex {rule[0]!r} does not compile: {e}") from e


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup then cosine decay to `end_lr_fraction * learning_rate`."""
  warmup = min(cfg.warmup, max(cfg.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.num_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


# Re-exported for callers that still import them from here; defined once in `params`.
param_path = params_lib.param_path
count_params = params_lib.count_params


def lr_mult_tree(params: Any, rules: tuple[tuple[str, float], ...]) -> Any:
  """Per-leaf learning-rate multipliers of `params` (1.0 where no rule matches)."""
  compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]

  def mult(path, _):
    name = params_lib.param_path(path)
    for pattern, m in compiled:
      if pattern.search(name):
        return m
    return 1.0

  return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_lr_mults(rules: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's `lr_mults` multiplier (paths from `params`)."""

  def init_fn(params):
    # Checked once, eagerly: a rule that selects no trainable parameter is most likely a typo
    # (or a job without that module, e.g. the text baseline has no gates), so say so.
    names = [params_lib.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, mult in rules:
      hits = [name for name in names if re.search(pattern, name)]
      if hits:
        logging.info("lr_mults %r x%g: %d parameters (%s ...)", pattern, mult, len(hits),
                     hits[0])
      else:
        logging.warning("lr_mults %r matches no trainable parameter", pattern)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    mults = lr_mult_tree(updates, rules)
    updates = jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
                           updates, mults)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


class EmaState(NamedTuple):
  """Optimizer state of `track_ema`: the moving average of the parameters it sees."""
  ema: Any


def track_ema(decay: float) -> optax.GradientTransformation:
  """Keeps `ema <- decay * ema + (1 - decay) * new_params` in the optimizer state.

  Last in a chain, its `updates` are the final ones, so `params + updates` are the
  parameters after this step; the updates pass through unchanged. The average starts at
  the initial parameters (no bias correction is needed then).
  """

  def init_fn(params):
    return EmaState(ema=jax.tree.map(jnp.copy, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("track_ema needs the parameters (optimizer.update passes them)")
    ema = jax.tree.map(
        lambda e, p, u: (decay * e + (1.0 - decay) * (p + u)).astype(e.dtype),
        state.ema, params, updates)
    return updates, EmaState(ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_params(optimizer: nnx.Optimizer) -> dict[str, Any]:
  """The moving average of `optimizer`'s parameters, as a pure dict for `nnx.update`.

  Raises:
    ValueError: the optimizer was built without `ema_decay` (no `EmaState` in its state).
  """
  found = [s for s in jax.tree.leaves(optimizer.opt_state,
                                      is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  if len(found) != 1:
    raise ValueError(f"expected one EmaState in the optimizer state, found {len(found)} "
                     "(was the optimizer built with train.ema_decay > 0?)")
  return nnx.to_pure_dict(found[0].ema)


def make_tx(cfg: OptimConfig) -> optax.GradientTransformation:
  """Clip by global norm, AdamW on the warmup-cosine schedule, the `lr_mults`, then (with
  `ema_decay`) the parameters' moving average."""
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))
  if cfg.lr_mults:
    parts.append(scale_by_lr_mults(tuple(tuple(r) for r in cfg.lr_mults)))
  if cfg.ema_decay:
    parts.append(track_ema(cfg.ema_decay))
  return optax.chain(*parts)


def rng_stream_names(node: Any) -> tuple[str, ...]:
  """Names (tags) of every `nnx.RngStream` inside `node`, sorted."""
  tags = {obj.tag for _, obj in nnx.iter_graph(node) if isinstance(obj, nnx.RngStream)}
  return tuple(sorted(tags))


def step_key(seed: int, step: jax.Array | int) -> jax.Array:
  """The RNG key of one training step: a pure function of (seed, step)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def place(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, or abstract values carrying the shardings.

  An abstract tree (from `nnx.eval_shape`) gets `jax.ShapeDtypeStruct`s with the shardings,
  so a step can be lowered ahead of time for devices this host does not have
  (`user_llm_jax.tpu`).
  """
  if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
    return distributed.device_put(tree, shardings)  # also onto several processes' devices
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  sub), shardings, tree)


class NonFiniteError(FloatingPointError):
  """Raised when a step produces a non-finite loss or gradient norm."""


@dataclasses.dataclass
class TrainStep:
  """A compiled train step over the split (model, optimizer) state.

  Build with `TrainStep.create(...)`; call as `state, metrics = step(state, batch, i)`.
  `state` holds everything but the RNG streams (which are re-derived every step), so it
  is exactly what a checkpoint stores. When the loss or the gradient norm is non-finite,
  the returned state equals the input state (the bad update is discarded on device) and
  `metrics['finite']` is False; the caller raises `NonFiniteError`.

  The logical-axis rules fixed at creation place the state and the batches, and are active
  (`sharding.axis_rules`) while the step is traced, so its activation constraints follow
  the same layout as its parameters.

  Attributes:
    graphdef: static structure of `(model, optimizer)`.
    rng_state: the RNG-stream variables (re-keyed from (seed, step) inside the step).
    state_shardings: NamedShardings of `state` on the mesh.
    batch_sharding: NamedSharding of a batch leaf's leading (batch) axis.
    mesh: the device mesh the step runs on.
    rules: the complete logical-axis rules table of the step.
    fn: the jitted function.
  """

  graphdef: Any
  rng_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  mesh: jax.sharding.Mesh
  rules: sharding_lib.Rules
  fn: Callable[..., Any]

  @classmethod
  def create(cls, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn, *,
             mesh: jax.sharding.Mesh, rules: sharding_lib.Rules | None = None, seed: int = 0,
             donate: bool = True,
             grad_groups: Mapping[str, Any] | None = None) -> tuple["TrainStep", Any]:
    """Shards `(model, optimizer)` onto `mesh` and compiles the step.

    Args:
      model: the model (its `nnx.Param`s carry logical sharding names).
      optimizer: `nnx.Optimizer(model, tx, wrt=...)`; `wrt` decides what trains.
      loss_fn: `(model, batch) -> (scalar loss, dict of scalar metrics)`.
      mesh: device mesh (`sharding.make_mesh`).
      rules: logical-axis rules (merged over `sharding.DEFAULT_RULES`); None takes the
        active ones (`sharding.axis_rules`).
      seed: base seed of the per-step dropout keys.
      donate: donate the input state buffers (off only for debugging).
      grad_groups: {name: nnx filter} of parameter groups whose gradient norms are
        reported as `grad_norm/<name>` (e.g. encoder, bridge, cross-attention).

    Returns:
      The step and the initial (sharded) state.
    """
    wrt = optimizer.wrt
    rules = sharding_lib.active_rules() if rules is None else sharding_lib.normalize_rules(rules)
    graphdef, state, rng_state = nnx.split((model, optimizer), nnx.Not(nnx.RngState), ...)
    state_shardings = sharding_lib.model_shardings(state, mesh, rules)
    state = place(state, state_shardings)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng_state = place(rng_state, replicated)
    batch_sharding = sharding_lib.logical_sharding(mesh, ("activation_batch",), rules)
    streams = rng_stream_names(model)

    def step_fn(state, rng_state, batch, step):
      model, optimizer = nnx.merge(graphdef, state, rng_state)
      key = step_key(seed, step)
      if streams:
        nnx.reseed(model, **{s: jax.random.fold_in(key, i) for i, s in enumerate(streams)})

      def loss_of(model):
        return loss_fn(model, batch)

      grad_fn = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, wrt), has_aux=True)
      (loss, aux), grads = grad_fn(model)
      grad_norm = optax.tree.norm(grads)
      group_norms = {f"grad_norm/{name}": optax.tree.norm(grads.filter(f))
                     for name, f in (grad_groups or {}).items()}
      optimizer.update(model, grads)
      new_state = nnx.state((model, optimizer), nnx.Not(nnx.RngState))
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      # Keep the last good state on device when the update is poisoned, so nothing
      # non-finite can ever reach a checkpoint.
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
      metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **group_norms,
                 **{k: jnp.asarray(v) for k, v in aux.items()}}
      return new_state, metrics

    fn = jax.jit(step_fn, out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())
    return cls(graphdef, rng_state, state_shardings, batch_sharding, mesh, rules, fn), state

  def place_batch(self, batch: Batch) -> dict[str, jax.Array]:
    """Puts a host batch on the mesh, split along its leading (batch) axis.

    With several processes each host holds its own slice of the global batch (the Grain
    pipeline shards by process), assembled here into one global array.
    """
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in batch.values()):
      return place(dict(batch), self.batch_sharding)
    if jax.process_count() > 1:
      return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
              for k, v in batch.items()}
    return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in batch.items()}

  def __call__(self, state: Any, batch: Batch, step: int) -> tuple[Any, dict[str, jax.Array]]:
    with sharding_lib.axis_rules(self.rules, self.mesh):
      return self.fn(state, self.rng_state, self.place_batch(batch), np.int32(step))

  def lower(self, state: Any, batch: Batch, step: int = 0):
    """Lowers the step for ahead-of-time compilation / cost analysis."""
    with sharding_lib.axis_rules(self.rules, self.mesh):
      return self.fn.lower(state, self.rng_state, self.place_batch(batch), np.int32(step))

  def merge(self, state: Any) -> tuple[nnx.Module, nnx.Optimizer]:
    """Rebuilds live `(model, optimizer)` objects from a state."""
    return nnx.merge(self.graphdef, state, self.rng_state)
