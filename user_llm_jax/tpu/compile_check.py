"""Ahead-of-time compile of a config's programs for a TPU slice: HBM fit, FLOPs, roofline.

    topo = topology.parse("v5e-8")
    report = compile_check.run(config, topo)       # compiles every program, one at a time
    print(compile_check.table(report))
    compile_check.raise_if_over(report)            # HbmError naming HBM, buffers, remedies

Per program and per device: the memory XLA's buffer assignment needs (arguments, outputs
not aliased to donated inputs, temporaries, code) against the chip's HBM; XLA's FLOPs and
bytes accessed (`cost_analysis`); and a roofline *estimate* of the step time,
max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), from the chip's published figures.
The estimate ignores collectives, host input and kernel efficiency, so real steps are
slower; its MFU is an upper bound. `cost_analysis()['optimal_seconds']` is not used (it
came back negative for TPU executables compiled on a CPU host).

The matmul audit reads the lowered StableHLO: the share of `dot_general` FLOPs whose
operands are bfloat16, and the largest float32 ones with their source location, which is
how a config's "bfloat16 end to end" is checked.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax.tpu import programs as programs_lib
from user_llm_jax.tpu import topology as topology_lib
from user_llm_jax.train import setup

GIB = topology_lib.GIB
# XLA's out-of-memory reports on TPU ("Ran out of memory in memory space hbm",
# RESOURCE_EXHAUSTED ...), raised at compile time.
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? .*memory|hbm", re.S)


class HbmError(RuntimeError):
  """A program needs more HBM per chip than the chip has."""


@dataclasses.dataclass
class Row:
  """One compiled (or failed) program; byte and FLOP figures are per device.

  Attributes:
    name, batch, tokens, unit, note: from the `Program`.
    ok: compiled and fits in HBM.
    error: the compiler's message when compilation failed (e.g. out of HBM).
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: memory analysis.
    hbm_needed: arguments + outputs - aliased + temporaries + code.
    flops, bytes_accessed: cost analysis.
    step_seconds_est: roofline estimate (max of compute and HBM time).
    bound: 'compute' or 'HBM', whichever term of the estimate is larger.
    mfu_bound: compute time / estimated time (an upper bound of MFU).
    throughput_est: `unit`s per second over the whole slice at the estimated time.
    lower_seconds, compile_seconds: wall time on this host.
    matmuls: the StableHLO matmul audit (`matmul_audit`).
    largest_values: the program's biggest arrays (`largest_values`).
  """

  name: str
  batch: int
  tokens: int
  unit: str
  note: str
  ok: bool = False
  error: str = ""
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  hbm_needed: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  step_seconds_est: float = 0.0
  bound: str = ""
  mfu_bound: float = 0.0
  throughput_est: float = 0.0
  lower_seconds: float = 0.0
  compile_seconds: float = 0.0
  matmuls: dict[str, Any] = dataclasses.field(default_factory=dict)
  largest_values: list[tuple[int, str, str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
  """Everything the compile check found, JSON-able with `dataclasses.asdict`."""

  config_name: str
  topology: str
  topology_name: str
  num_slices: int
  num_chips: int
  device_kind: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bandwidth: float
  mesh: dict[str, int]
  rows: list[Row]
  facts: dict[str, Any]


def build_mesh(config: ml_collections.ConfigDict,
               topo: topology_lib.Topology) -> tuple[jax.sharding.Mesh, Any]:
  """The config's mesh and rules over the topology's devices.

  One slice: `train.setup.mesh_from_config` on its devices. Several slices: the `data`
  axis spans them (data parallelism over the data-center network, everything else
  inside a slice), as `mesh_utils.create_hybrid_device_mesh` lays it out.

  Raises:
    ConfigError: the mesh shape does not fit the slice (named).
  """
  devices = topo.devices()
  if topo.num_slices == 1:
    try:
      return setup.mesh_from_config(config.mesh, devices)
    except ValueError as e:
      raise config_lib.ConfigError(f"config key 'mesh.shape'={tuple(config.mesh.shape)} on "
                                   f"{topo.describe()}: {e}") from e
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  names = tuple(config.mesh.axis_names)
  shape = list(config.mesh.shape)
  if "data" not in names:
    raise config_lib.ConfigError(f"config key 'mesh.axis_names'={names}: multi-slice "
                                 "needs a 'data' axis to span the slices")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // max(known, 1)
  data = names.index("data")
  if math.prod(shape) != len(devices) or shape[data] % topo.num_slices:
    raise config_lib.ConfigError(
        f"config key 'mesh.shape'={tuple(config.mesh.shape)}: on {topo.describe()} the "
        f"axes must multiply to {len(devices)} chips with the 'data' axis a multiple of "
        f"{topo.num_slices} slices")
  ici = list(shape)
  ici[data] //= topo.num_slices
  dcn = [1] * len(shape)
  dcn[data] = topo.num_slices
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  mesh = jax.sharding.Mesh(grid, names,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  _, rules = setup.mesh_from_config(
      ml_collections.ConfigDict({"shape": (1,) * len(names), "axis_names": names,
                                 "rules": config.mesh.rules}), devices[:1])
  return mesh, rules


_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_DOT = re.compile(
    r"stablehlo\.dot_general[^\n]*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
    r"[^\n]*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)(?: loc\((#loc\d*)\))?")
_LOC = re.compile(r'^(#loc\d*) = loc\("([^"]*)"', re.M)


def _tensor(text: str) -> tuple[tuple[int, ...], str]:
  match = _TENSOR.fullmatch(text)
  if not match:
    return (), "?"
  dims = tuple(int(d) for d in match.group(1).split("x") if d)
  return dims, match.group(2)


def matmul_audit(stablehlo: str, top: int = 5) -> dict[str, Any]:
  """Matmul FLOPs of a lowered program by operand dtype (global shapes, one loop trip).

  Returns:
    {'flops_by_dtype': {dtype: flops}, 'bf16_share': fraction of matmul FLOPs with
    bfloat16 operands, 'largest_non_bf16': [(flops, 'lhs x rhs -> out', location)]}.
  """
  locations = dict(_LOC.findall(stablehlo))
  by_dtype: dict[str, float] = {}
  others = []
  for contracting, lhs_t, rhs_t, out_t, loc in _DOT.findall(stablehlo):
    lhs, lhs_dtype = _tensor(lhs_t)
    _, rhs_dtype = _tensor(rhs_t)
    out, _ = _tensor(out_t)
    k = math.prod(lhs[int(i)] for i in contracting.split(",") if i.strip())
    flops = 2.0 * math.prod(out) * k
    key = lhs_dtype if lhs_dtype == rhs_dtype else f"{lhs_dtype}x{rhs_dtype}"
    by_dtype[key] = by_dtype.get(key, 0.0) + flops
    if key != "bf16":
      others.append((flops, f"{lhs_t} x {rhs_t} -> {out_t}", locations.get(loc, loc)))
  total = sum(by_dtype.values())
  others.sort(key=lambda x: -x[0])
  return {"flops_by_dtype": by_dtype,
          "bf16_share": by_dtype.get("bf16", 0.0) / total if total else 0.0,
          "largest_non_bf16": others[:top]}


_VALUE = re.compile(r"^\s*%[\w#.]+(?::\d+)? = \"?([\w.]+)[^\n]*?(tensor<[^>]*>)(?: loc\((#loc\d*)\))?$",
                    re.M)
_ITEMSIZE = {"f64": 8, "i64": 8, "ui64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2,
             "i16": 2, "i8": 1, "ui8": 1, "i1": 1}


def largest_values(stablehlo: str, top: int = 5) -> list[tuple[int, str, str, str]]:
  """The biggest arrays a lowered program computes (global shapes, before sharding).

  Returns:
    [(bytes, op, type, source location)], largest first: where activation memory goes.
  """
  locations = dict(_LOC.findall(stablehlo))
  found = []
  for op, tensor, loc in _VALUE.findall(stablehlo):
    dims, dtype = _tensor(tensor)
    found.append((math.prod(dims) * _ITEMSIZE.get(dtype, 4), op, tensor,
                  locations.get(loc, loc)))
  found.sort(key=lambda x: -x[0])
  return found[:top]


def _memory(row: Row, compiled: jax.stages.Compiled) -> None:
  stats = compiled.memory_analysis()
  row.argument_bytes = int(stats.argument_size_in_bytes)
  row.output_bytes = int(stats.output_size_in_bytes)
  row.alias_bytes = int(stats.alias_size_in_bytes)
  row.temp_bytes = int(stats.temp_size_in_bytes)
  row.code_bytes = int(stats.generated_code_size_in_bytes)
  row.hbm_needed = (row.argument_bytes + row.output_bytes - row.alias_bytes + row.temp_bytes
                    + row.code_bytes)


def _cost(row: Row, compiled: jax.stages.Compiled, topo: topology_lib.Topology) -> None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  row.flops = float(cost.get("flops", 0.0))
  row.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  compute = row.flops / topo.chip.peak_bf16_flops
  memory = row.bytes_accessed / topo.chip.hbm_bandwidth
  row.step_seconds_est = max(compute, memory)
  row.bound = "compute" if compute >= memory else "HBM"
  row.mfu_bound = compute / row.step_seconds_est if row.step_seconds_est else 0.0
  row.throughput_est = row.tokens / row.step_seconds_est if row.step_seconds_est else 0.0


def run(config: ml_collections.ConfigDict, topo: topology_lib.Topology,
        log: Callable[[str], None] = print, only: tuple[str, ...] = ()) -> Report:
  """Lowers and compiles every program of the config's job for `topo`, one at a time.

  A program the compiler rejects for lack of HBM becomes a row with `ok=False` and the
  compiler's message; the programs that start from its outputs are skipped.

  Args:
    config: the experiment config (its job, mesh, `aot` sizes).
    topo: the slice(s) to compile for.
    log: progress messages.
    only: compile just the programs whose names contain one of these strings (and the
      ones they start from); empty: all.

  Raises:
    ConfigError, TopologyError: a config or topology that cannot be compiled at all.
  """
  mesh, rules = build_mesh(config, topo)
  log(f"{config.get('name', '?')} on {topo.describe()}: mesh "
      f"{dict(zip(mesh.axis_names, mesh.devices.shape))}")
  plan = programs_lib.plan(config, mesh, rules)
  rows: list[Row] = []
  outputs: programs_lib.Outputs = {}
  selected = [p for p in plan.programs if not only or any(o in p.name for o in only)]
  if not selected:
    raise config_lib.ConfigError(f"no program matches {list(only)}; the config's programs: "
                                 f"{[p.name for p in plan.programs]}")
  needed = {p.name for p in selected}
  if any(n.endswith("/decode") for n in needed):
    needed |= {n.replace("/decode", "/prefill") for n in needed if n.endswith("/decode")}
  if any(n.endswith("/prefill") for n in needed):
    needed |= {n.replace("/prefill", "/user_context") for n in needed if n.endswith("/prefill")}
  for program in (p for p in plan.programs if p.name in needed):
    row = Row(program.name, program.batch, program.tokens, program.unit, program.note)
    rows.append(row)
    log(f"  compiling {program.name} ...")
    t0 = time.perf_counter()
    try:
      lowered = program.lower(outputs)
    except KeyError as e:
      row.error = f"skipped: needs the outputs of {e.args[0]}, which did not compile"
      continue
    row.lower_seconds = time.perf_counter() - t0
    text = lowered.as_text(debug_info=True)
    row.matmuls = matmul_audit(text)
    row.largest_values = largest_values(text)
    del text
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      # The TPU compiler reports running out of HBM as an XlaRuntimeError at compile time.
      if not _OOM.search(str(e)):
        raise
      row.compile_seconds = time.perf_counter() - t0
      row.error = str(e)
      continue
    row.compile_seconds = time.perf_counter() - t0
    _memory(row, compiled)
    _cost(row, compiled, topo)
    row.ok = row.hbm_needed <= topo.chip.hbm_bytes
    programs_lib.record_outputs(outputs, program, lowered, compiled)
    del compiled, lowered
  return Report(
      config_name=str(config.get("name", "")), topology=topo.name,
      topology_name=topo.topology_name, num_slices=topo.num_slices,
      num_chips=topo.num_chips, device_kind=topo.chip.device_kind,
      hbm_bytes=topo.chip.hbm_bytes, peak_bf16_flops=topo.chip.peak_bf16_flops,
      hbm_bandwidth=topo.chip.hbm_bandwidth,
      mesh={str(k): int(v) for k, v in zip(mesh.axis_names, mesh.devices.shape)},
      rows=rows, facts=plan.facts)


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _si(n: float) -> str:
  for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= scale:
      return f"{n / scale:.1f} {suffix}"
  return f"{n:.0f}"


def table(report: Report) -> str:
  """The report as a Markdown table plus the notes that qualify its estimates."""
  chips = report.num_chips
  head = (f"{report.config_name} on {report.topology} ({report.topology_name}"
          f"{f' x {report.num_slices} slices' if report.num_slices > 1 else ''}, {chips} x "
          f"{report.device_kind}, {_gib(report.hbm_bytes)} GiB HBM, "
          f"{report.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{report.hbm_bandwidth / 1e9:.0f} GB/s per chip), mesh {report.mesh}")
  lines = [head, "",
           "| program | batch (per chip) | HBM GiB / chip: args + out + temp = total | fits "
           "| GFLOP / chip | est. step ms (bound) | est. MFU bound | est. throughput "
           "| bf16 matmul FLOPs | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in report.rows:
    per_chip = r.batch / chips
    batch = f"{r.batch} ({per_chip:g})"
    if r.error:
      lines.append(f"| {r.name} | {batch} | - | **no**: "
                   f"{'out of HBM' if _OOM.search(r.error) else r.error[:60]} | - | - | - "
                   f"| - | {r.matmuls.get('bf16_share', 0):.0%} | {r.compile_seconds:.1f} |")
      continue
    memory = (f"{_gib(r.argument_bytes)} + {_gib(r.output_bytes - r.alias_bytes)} + "
              f"{_gib(r.temp_bytes)} = **{_gib(r.hbm_needed)}**")
    lines.append(
        f"| {r.name} | {batch} | {memory} | {'yes' if r.ok else '**no**'} "
        f"({r.hbm_needed / report.hbm_bytes:.0%}) | {r.flops / 1e9:,.1f} | "
        f"{r.step_seconds_est * 1e3:.2f} ({r.bound}) | {r.mfu_bound:.0%} | "
        f"{_si(r.throughput_est)} {r.unit}/s | {r.matmuls.get('bf16_share', 0):.0%} | "
        f"{r.compile_seconds:.1f} |")
  lines += ["",
            "HBM: XLA's buffer assignment per chip (outputs aliased to donated inputs counted "
            "once). Step time, MFU and throughput are roofline *estimates*: max(XLA FLOPs / "
            "peak bf16 FLOP/s, XLA bytes accessed / HBM bandwidth), without collectives or "
            "input; real steps are slower. Throughput is over the whole slice."]
  for key, value in report.facts.items():
    if key.endswith("_state"):
      parts = "; ".join(f"{part}: " + ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in by.items())
                        for part, by in value.items())
      lines.append(f"{key[:-len('_state')]} train state (global, before sharding): {parts}")
    elif key.endswith("_llm"):
      lines.append(f"{key[:-len('_llm')]} LLM architecture from {value}")
  for r in report.rows:
    worst = r.matmuls.get("largest_non_bf16") or []
    if worst and r.matmuls.get("bf16_share", 1.0) < 0.999:
      flops, shapes, where = worst[0]
      lines.append(f"{r.name}: largest non-bf16 matmul {shapes} ({flops / 1e9:.2f} GFLOP "
                   f"global) at {where}")
  return "\n".join(lines)


def _biggest_buffers(row: Row, report: Report) -> str:
  """The program's largest arrays and the train state's bytes, for an HBM message."""
  shards = report.mesh.get("data", 1) * report.mesh.get("fsdp", 1)
  lines = [f"{size / GIB:.2f} GiB global (~{size / shards / GIB:.2f} GiB per chip when the "
           f"batch is split {shards} ways): {op} -> {tensor} at {where}"
           for size, op, tensor, where in row.largest_values]
  for key, parts in report.facts.items():
    if key.endswith("_state"):
      for part, by_dtype in parts.items():
        total = sum(by_dtype.values())
        lines.append(f"train state {part}: {total / GIB:.2f} GiB global ("
                     + ", ".join(f"{d} {b / GIB:.2f}" for d, b in by_dtype.items()) + ")")
  return "\n    ".join(lines)


def raise_if_over(report: Report) -> None:
  """Raises HbmError when a program does not fit, naming HBM, buffers and remedies.

  Raises:
    HbmError: the first program over the chip's HBM.
  """
  for r in report.rows:
    if r.ok or r.error.startswith("skipped"):
      continue
    per_chip = r.batch / report.num_chips
    keys = [k for k in report.facts.get("memory_keys", []) if k.endswith("remat_policy")]
    remat = ("remat: " + ", ".join(f"--config.{k}=full" for k in keys) if keys
             else "remat, which this config's layers do not offer yet")
    remedies = (
        f"lower the batch (train.batch_size / eval.batch_size: {r.batch} global = "
        f"{per_chip:g} per chip); shard parameters and optimizer state over chips with an "
        f"fsdp axis (--config.mesh.shape=\"(1,-1,1)\", or (data, fsdp, tensor) such as "
        f"\"(2,-1,1)\"); store frozen weights in bfloat16 (--config.llm.param_dtype=bfloat16); "
        f"rematerialise layer activations in the backward pass ({remat}); or use a chip "
        f"with more HBM")
    if r.error:
      found = (f"the TPU compiler reports: {r.error.strip().splitlines()[0][:400]}")
    else:
      found = (f"it needs {_gib(r.hbm_needed)} GiB per chip: arguments "
               f"{_gib(r.argument_bytes)} GiB (parameters, optimizer state, batch), "
               f"temporaries {_gib(r.temp_bytes)} GiB (activations kept for the backward "
               f"pass), outputs {_gib(r.output_bytes - r.alias_bytes)} GiB")
    raise HbmError(
        f"{r.name} does not fit in HBM on {report.topology} ({report.device_kind}, "
        f"{_gib(report.hbm_bytes)} GiB HBM per chip): {found}.\nBiggest buffers:\n    "
        f"{_biggest_buffers(r, report)}\nTo fit: {remedies}.")
