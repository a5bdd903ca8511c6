r"""Launcher: `python -m experiments.main --config=FILE[:variant] --workdir=DIR [--mode=...]`.

Examples:

  python -m experiments.main --config=experiments/configs/encoder_movielens.py:smoke \
      --workdir=/tmp/encoder_smoke
  python -m experiments.main --config=experiments/configs/encoder_movielens.py \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/encoder_ml

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
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU slices).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  launcher.run(_CONFIG.value, workdir=_WORKDIR.value, mode=_MODE.value,
               config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
               distributed=_DISTRIBUTED.value)


if __name__ == "__main__":
  app.run(main, flags_parser=launcher.parse_flags)
