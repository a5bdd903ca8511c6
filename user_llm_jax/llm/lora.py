"""Low-rank adapters (LoRA) on chosen decoder projections.

`apply_lora` swaps the chosen `Einsum` projections of a `Decoder` for `LoraEinsum`
wrappers, in place: y = base(x) + (alpha / rank) * B(A(x)). A is [in..., R] (random), B is
[R, out...] (zeros), so the model is unchanged at step 0. Adapter weights are `LoraParam`
variables (a subclass of `nnx.Param`), so `nnx.Optimizer(model, tx, wrt=LoraParam)` trains
them alone while `wrt=nnx.Param` still selects everything. `merge_lora` folds the adapters
back into plain `Einsum` kernels (for export or faster inference).

A decoder with stacked (scanned) layers gets the same adapters, stacked like its kernels
(`layers/attn/q/lora_a` [L,D,R]): the layers are unrolled, adapted and stacked again, so
the adapter values equal those of an unrolled decoder adapted with the same seed. A stack
needs identical layers, hence adapters on every layer (`LoraConfig.layers=None`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax.llm.layers import Einsum, _parse_eqn
from user_llm_jax.llm.model import set_layer_scan
from user_llm_jax.params import count_params
from user_llm_jax.sharding import partitioned

ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


class LoraParam(nnx.Param):
  """A LoRA adapter weight (selected alone by optimizer / state filters)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their size.

  Attributes:
    rank: adapter rank R.
    alpha: scaling numerator; the update is scaled by alpha / rank.
    targets: projection names among ('q','k','v','o','gate','up','down').
    layers: decoder layer indices to adapt (None: all).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "v")
  layers: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
    unknown = set(self.targets) - set(ALL_TARGETS)
    if unknown or not self.targets:
      raise ValueError(f"LoraConfig.targets {tuple(self.targets)}: unknown {sorted(unknown)}; "
                       f"choose from {ALL_TARGETS}")


class LoraEinsum(nnx.Module):
  """`base(x) + scale * einsum(einsum(x, A), B)` for a wrapped `Einsum` projection."""

  def __init__(self, base: Einsum, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.base = base
    self.scale = alpha / rank
    xs, ws, outs = _parse_eqn(base.eqn)
    kin, kout = ws[:base.in_ndim], ws[base.in_ndim:]
    mid = "".join(c for c in xs if c not in kin) + "R"  # R: the adapter rank axis
    self.eqn_a = f"{xs},{kin}R->{mid}"
    self.eqn_b = f"{mid},R{kout}->{outs}"
    self.eqn_merge = f"{kin}R,R{kout}->{ws}"
    shape = base.kernel.shape
    names = tuple(base.kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
    param_dtype = base.kernel[...].dtype
    fan_in = math.prod(shape[:base.in_ndim])
    a_init = partitioned(nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in)),
                          names[:base.in_ndim] + ("lora_rank",))
    b_init = partitioned(nnx.initializers.zeros, ("lora_rank",) + names[base.in_ndim:])
    self.lora_a = LoraParam(a_init(rngs.params(), (*shape[:base.in_ndim], rank), param_dtype))
    self.lora_b = LoraParam(b_init(rngs.params(), (rank, *shape[base.in_ndim:]), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.base.dtype
    h = jnp.einsum(self.eqn_a, x.astype(dtype), self.lora_a[...].astype(dtype))  # [...,R]
    return self.base(x) + self.scale * jnp.einsum(self.eqn_b, h,
                                                  self.lora_b[...].astype(dtype))

  def delta(self) -> jax.Array:
    """The kernel update scale * A @ B, in the base kernel's layout."""
    return self.scale * jnp.einsum(self.eqn_merge, self.lora_a[...], self.lora_b[...])


def _projections(model: nnx.Module, layers: Sequence[int] | None):
  """Yields (parent module, attribute name) for every projection a LoRA target can name."""
  indices = range(len(model.layers)) if layers is None else layers
  for i in indices:
    if not 0 <= i < len(model.layers):
      raise ValueError(f"LoRA layer index {i} out of range [0, {len(model.layers)})")
    layer = model.layers[i]
    for name in ATTN_TARGETS:
      yield layer.attn, name
    for name in MLP_TARGETS:
      yield layer.mlp, name


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Wraps the targeted projections of `model` (a Decoder) with adapters, in place.

  New adapter weights are created on the default device; for a model already placed on a
  mesh, call `sharding.shard_model(model, mesh)` afterwards (they carry logical axes).

  Returns:
    `model`, for chaining.

  Raises:
    ValueError: if a targeted projection already has an adapter, or if the decoder's
      layers are stacked and `cfg.layers` names only some of them.
  """
  scanned = getattr(model, "scanned", False)
  if scanned and cfg.layers is not None and set(cfg.layers) != set(range(model.cfg.num_layers)):
    raise ValueError(f"LoraConfig.layers={tuple(cfg.layers)}: a decoder with scanned layers "
                     "takes adapters on every layer only (layers=None), or build it with "
                     "scan_layers=False")
  if scanned:
    set_layer_scan(model, False)
  for parent, name in _projections(model, cfg.layers):
    if name not in cfg.targets:
      continue
    proj = getattr(parent, name)
    if isinstance(proj, LoraEinsum):
      raise ValueError(f"projection {name!r} already has a LoRA adapter")
    setattr(parent, name, LoraEinsum(proj, cfg.rank, cfg.alpha, rngs=rngs))
  if scanned:
    set_layer_scan(model, True)
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and removes the wrappers, in place."""
  scanned = getattr(model, "scanned", False)
  if scanned:
    set_layer_scan(model, False)
  for parent, name in _projections(model, None):
    proj = getattr(parent, name)
    if isinstance(proj, LoraEinsum):
      base = proj.base
      base.kernel[...] = base.kernel[...] + proj.delta().astype(base.kernel[...].dtype)
      setattr(parent, name, base)
  if scanned:
    set_layer_scan(model, True)
  return model


def lora_param_count(model: nnx.Module) -> int:
  """Number of scalar adapter weights in `model`."""
  return count_params(model, LoraParam)
