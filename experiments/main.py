r"""Launcher: `python -m experiments.main --config=FILE[:variant] --workdir=DIR [--mode=...]`.

Examples:

  python -m experiments.main --config=experiments/configs/encoder_movielens.py:smoke \
      --workdir=/tmp/encoder_smoke
  python -m experiments.main --config=experiments/configs/encoder_movielens.py \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/encoder_ml

Several processes (here two CPU processes on one machine; on a Cloud TPU slice
`--distributed` alone, see experiments/tpu/launch.sh), each started with its own id:

  python -m experiments.main --config=experiments/configs/encoder_movielens.py:smoke \
      --workdir=/tmp/encoder_2p --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=0   # and --process_id=1 in a second shell

Every config key can be overridden with `--config.section.key=value`; an unknown key or a
value of the wrong type stops the launch with a message naming the key. Rerunning the same
command with the same --workdir resumes from the latest checkpoint. The job that runs is
the config's `job` (for --mode=train) or the registered job of --mode
(see user_llm_jax/jobs/__init__.py).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from user_llm_jax.jobs import launcher

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/configs/encoder_movielens.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of checkpoints, TensorBoard files, summaries and generated data.")
_MODE = flags.DEFINE_string(
    "mode", "train", "What to run: 'train' (the config's job) or a registered mode.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a process group first (jax.distributed.initialize()): "
    "detected on Cloud TPU slices, else given by the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, e.g. "
    "127.0.0.1:12345 for several processes on one machine (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the run (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (env JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  launcher.run(_CONFIG.value, workdir=_WORKDIR.value, mode=_MODE.value,
               config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
               distributed=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


if __name__ == "__main__":
  app.run(main, flags_parser=launcher.parse_flags)
