r"""Compile a config's programs for a Cloud TPU slice on this host: HBM fit, FLOPs, roofline.

  pip install -e '.[tpu]'    # libtpu: TPU topologies without a TPU
  python -m experiments.compile_check \
      --config=experiments/configs/encoder_movielens.py:tpu --topology=v5e-8
  python -m experiments.compile_check \
      --config=experiments/configs/user_llm_movielens.py:tpu --config.bridge.use_perceiver=True \
      --topology=v5p-8
  python -m experiments.compile_check --config=experiments/configs/encoder_movielens.py:tpu \
      --topology=v5e-256 --num_slices=2 --config.train.batch_size=65536

Builds the slice's topology (`--topology`: v5e-8, v5e-256, v5p-128, v4-32, v6e-8, ... or a
torus such as v5e:2x2), lays out the config's mesh on it, lowers and compiles the job's
train step and evaluation / decoding steps with abstract inputs (no weights, no data:
vocabulary sizes come from the config's `aot` section), prints a table of per-chip HBM
against the chip's, FLOPs per step and a roofline estimate of step time, MFU and
throughput, and writes it as JSON (`--output`). Exits non-zero, naming HBM, the biggest
buffers and what to change, when a program does not fit.
"""

import os

# Compiling for a topology needs no accelerator; do not let JAX probe for a local TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from user_llm_jax import config as config_lib  # noqa: E402
from user_llm_jax.jobs import launcher  # noqa: E402
from user_llm_jax.tpu import compile_check  # noqa: E402
from user_llm_jax.tpu import topology as topology_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config, e.g. experiments/configs/encoder_movielens.py:tpu.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Cloud TPU slice: v5e-8, v5e-256, v5p-8, v5p-128, v4-32, v6e-8, ... "
    "(v4/v5p count TensorCores, v5e/v6e chips) or a torus such as v5e:2x2.")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Identical slices of a multi-slice job (the mesh's data axis spans them).")
_OUTPUT = flags.DEFINE_string(
    "output", "", "JSON report path (default: compile_check_<config>_<topology>.json).")
_PROGRAMS = flags.DEFINE_list(
    "programs", [], "Compile only the programs whose names contain one of these, e.g. "
    "train_step (default: all of the job's).")
flags.mark_flags_as_required(["config", "topology"])


def _default_output(config_name: str, topo: topology_lib.Topology) -> str:
  slices = f"_x{topo.num_slices}" if topo.num_slices > 1 else ""
  stem = f"compile_check_{config_name}_{topo.name}{slices}"
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) + ".json"


def parse_flags(argv: list[str]) -> list[str]:
  """Flags, with a bad `--config.a.b=...` override reported as one line naming the key."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"error: {launcher.explain_override_error(argv) or (lines[0] if lines else e)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    config_lib.validate(config, config_lib.load_config_file(config_file.partition(":")[0]))
    topo = topology_lib.parse(_TOPOLOGY.value, _NUM_SLICES.value)
    report = compile_check.run(config, topo, only=tuple(_PROGRAMS.value))
  except (config_lib.ConfigError, topology_lib.TopologyError) as e:
    sys.exit(f"error: {e}")
  print(compile_check.table(report), flush=True)
  output = _OUTPUT.value or _default_output(report.config_name, topo)
  with open(output, "w") as f:
    json.dump(dataclasses.asdict(report), f, indent=1, default=str)
  print(f"wrote {output}")
  try:
    compile_check.raise_if_over(report)
  except compile_check.HbmError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
