"""Cloud TPU slice names -> topologies a CPU host can compile for, and each chip's figures.

Cloud TPU names slices by generation and size, e.g. `v5e-8` (8 chips), `v5p-128` and
`v4-32` (TensorCores: 64 and 16 chips), `v6e-256`. `parse` turns such a name (or an
explicit `v5e:2x4` / `v5p:2x2x1` topology) into the arguments of
`jax.experimental.topologies.get_topology_desc`, which needs `libtpu` (the `[tpu]` extra)
but no TPU: the devices it returns are enough to build a mesh and compile for it.

Chip figures are the published per-chip peaks (Cloud TPU system-architecture pages):
dense bfloat16 FLOP/s, HBM capacity and HBM bandwidth. They feed a roofline estimate
only; measured step times are lower.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence

import jax

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's published per-chip figures.

  Attributes:
    generation: the Cloud TPU name prefix ('v5e').
    device_kind: `jax.Device.device_kind` of its devices ('TPU v5 lite').
    peak_bf16_flops: dense bfloat16 FLOP/s per chip.
    hbm_bytes: HBM capacity per chip.
    hbm_bandwidth: HBM bytes/s per chip.
    dims: 2 (a 2D torus, named by chips) or 3 (a 3D torus, named by TensorCores).
    cores_per_chip: TensorCores per chip, for names counted in TensorCores (v4, v5p).
    chip_config: `get_topology_desc`'s chip_config_name (one device per chip).
  """

  generation: str
  device_kind: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  dims: int
  cores_per_chip: int
  chip_config: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 3, 2, "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 2, 1, "default"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 3, 2, "default"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, 2, 1, "default"),
}
# Other spellings Cloud TPU uses for the same generations.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}

CHIPS_PER_HOST_BOUNDS = (2, 2, 1)  # 4 chips per host, as on multi-host v4/v5e/v5p/v6e slices


class TopologyError(ValueError):
  """A slice name that is not a Cloud TPU topology (the message says what is expected)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or several identical ones) to compile for.

  Attributes:
    name: the name it was parsed from ('v5e-8').
    chip: the generation's figures.
    shape: chips along each torus axis, e.g. (2, 4) or (2, 2, 4).
    num_slices: identical slices joined over the data-center network (multi-slice).
  """

  name: str
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    """`get_topology_desc`'s topology_name, e.g. 'v5e:2x4'."""
    return f"{self.chip.generation}:{'x'.join(str(s) for s in self.shape)}"

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return (f"{self.name} ({self.topology_name}, {self.chips_per_slice} chips{slices}, "
            f"{self.chip.device_kind})")

  def devices(self) -> list[jax.Device]:
    """The slice's devices, one per chip (needs libtpu; no TPU needed).

    Raises:
      TopologyError: libtpu is not installed, or rejects the topology.
    """
    # libtpu takes a machine-wide lock meant for processes that drive TPUs; compiling
    # needs none, and parallel test workers or other jobs may hold it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=self.topology_name,
          chip_config_name=self.chip.chip_config,
          chips_per_host_bounds=_host_bounds(self.shape), num_slices=self.num_slices)
    except (RuntimeError, ValueError) as e:
      raise TopologyError(
          f"cannot build TPU topology {self.topology_name} x {self.num_slices} slice(s): {e}. "
          "Compiling for TPU on a host without TPUs needs libtpu: "
          "pip install -e '.[tpu]'") from e
    devices = list(desc.devices)
    if len(devices) != self.num_chips:
      raise TopologyError(f"{self.topology_name}: libtpu gave {len(devices)} devices for "
                          f"{self.num_chips} chips (chip config {self.chip.chip_config!r})")
    return devices


def _host_bounds(shape: Sequence[int]) -> tuple[int, int, int]:
  """Chips per host, clipped to a slice smaller than one host."""
  full = tuple(shape) + (1,) * (3 - len(shape))
  return tuple(min(b, s) for b, s in zip(CHIPS_PER_HOST_BOUNDS, full))  # type: ignore


SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


def _torus_2d(chips: int) -> tuple[int, int] | None:
  """v5e / v6e slice shapes (Cloud TPU's v5e-1 ... v5e-256)."""
  return SHAPES_2D.get(chips)


def _torus_3d(chips: int) -> tuple[int, int, int] | None:
  """v4 / v5p slice shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ..."""
  if chips < 4:
    return None
  shape = [2, 2, 1]
  axis = 2
  while math.prod(shape) < chips:
    shape[axis] *= 2
    axis = (axis - 1) % 3 if shape != [2, 2, 2] else 2
  return tuple(shape) if math.prod(shape) == chips else None


def parse(name: str, num_slices: int = 1) -> Topology:
  """A Cloud TPU slice name -> `Topology`.

  Args:
    name: 'v5e-8', 'v5litepod-16', 'v6e-256' (chips); 'v4-32', 'v5p-128' (TensorCores,
      2 per chip); or an explicit torus 'v5e:2x2', 'v5p:2x2x1'.
    num_slices: identical slices of a multi-slice job (>= 1).

  Raises:
    TopologyError: naming what was expected.
  """
  if not isinstance(num_slices, int) or num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices!r}: expected an integer >= 1")
  known = ", ".join(sorted(CHIPS))
  text = name.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
  if not match:
    raise TopologyError(
        f"--topology={name!r}: expected a Cloud TPU slice name such as v5e-8, v5p-128, "
        f"v4-32, v6e-256 or a torus such as v5e:2x2 / v5p:2x2x1 (generations: {known})")
  generation, count, torus = match.groups()
  generation = ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise TopologyError(f"--topology={name!r}: unknown TPU generation {generation!r}; "
                        f"known: {known}")
  chip = CHIPS[generation]
  if torus is not None:
    shape = tuple(int(s) for s in torus.split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise TopologyError(f"--topology={name!r}: {generation} slices are {chip.dims}D tori "
                          f"of positive sizes, e.g. {generation}:"
                          f"{'x'.join(['2'] * chip.dims)}")
    return Topology(name, chip, shape, num_slices)
  count = int(count)
  if count % chip.cores_per_chip:
    raise TopologyError(f"--topology={name!r}: {generation} slice names count TensorCores "
                        f"({chip.cores_per_chip} per chip); {count} is not a multiple")
  chips = count // chip.cores_per_chip
  shape = _torus_2d(chips) if chip.dims == 2 else _torus_3d(chips)
  if shape is None:
    unit = "TensorCores" if chip.cores_per_chip > 1 else "chips"
    sizes = (list(SHAPES_2D) if chip.dims == 2
             else [chip.cores_per_chip * 4 * 2**i for i in range(11)])
    raise TopologyError(f"--topology={name!r}: no {generation} slice has {count} {unit}; "
                        f"valid sizes: {', '.join(str(s) for s in sizes)}")
  return Topology(name, chip, shape, num_slices)
