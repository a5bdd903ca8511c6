"""What `experiments/main.py` calls: flag parsing with clean errors, validation, dispatch.

Errors a user can fix (an unknown config key, a wrong type, a missing data directory, an
incompatible checkpoint) end the process with a one-line `error: ...` message and a
non-zero exit status instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from absl import logging as absl_logging

from user_llm_jax import config as config_lib
from user_llm_jax import jobs

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=.*)?$")


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean bad input, not a bug (reported without a traceback).

  `FileNotFoundError` counts only when raised by the project's own checks (a message, no
  errno); one raised by the OS carries an errno and is re-raised with its traceback.
  """
  from data_pipelines import records  # pylint: disable=g-import-not-at-top
  from user_llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from user_llm_jax.train import checkpointing, train_step  # pylint: disable=g-import-not-at-top
  errors = [config_lib.ConfigError, sharding.MeshError, FileNotFoundError, NotADirectoryError,
            records.BadInputError, checkpointing.CheckpointError, train_step.NonFiniteError]
  try:
    from data_pipelines import timelines  # pylint: disable=g-import-not-at-top
    errors.append(timelines.EmptyDatasetError)
  except (ImportError, AttributeError):
    pass
  return tuple(errors)


def _config_arg(argv: Sequence[str]) -> tuple[str, str | None] | None:
  """(path, variant) of the `--config=path[:variant]` argument, if given."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      path, _, variant = value.partition(":")
      return path, variant or None
  return None


def explain_override_error(argv: Sequence[str]) -> str | None:
  """Names the first `--config.a.b=...` override whose key the config does not have."""
  found = _config_arg(argv)
  if found is None:
    return None
  try:
    config = config_lib.load_config_file(*found)
  except Exception:  # The config itself is broken: reported by the caller.
    return None
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    node: Any = config
    parts = match.group(1).split(".")
    for depth, part in enumerate(parts):
      section = ".".join(parts[:depth]) or "<top level>"
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        valid = (", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict)
                 else f"none ({section} is a value, not a section)")
        return (f"unknown config key {'.'.join(parts[:depth + 1])!r} in override {arg!r}; "
                f"valid keys of {section}: {valid}")
      node = node[part]
  return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`app.run` flags parser that turns flag/config errors into one-line messages."""
  jobs.import_job_modules()  # Job modules may define flags of their own.
  try:
    return flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # An unknown `--config.x.y` key surfaces as a raw AttributeError/KeyError or as an
    # "unknown flag" depending on the path: name the key and the valid ones ourselves.
    message = explain_override_error(argv)
    if message is None:
      # absl wraps errors raised inside a config file; keep the most specific line.
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      message = lines[0] if lines else repr(e)
      if len(lines) > 1:
        message += f" ({lines[-1]})"
    sys.exit(f"error: {message}")


def run(config: ml_collections.ConfigDict, *, workdir: str, mode: str,
        config_file: str | None, distributed: bool = False,
        coordinator_address: str | None = None, num_processes: int | None = None,
        process_id: int | None = None) -> Any:
  """Validates `config` against its file's `get_config()` and runs the job.

  Args:
    config: the parsed config (variant + overrides).
    workdir: the run's directory (checkpoints, summaries, generated data).
    mode: 'train' or another registered mode.
    config_file: path of the config file (its `get_config()` is the schema).
    distributed: join a process group first (`jax.distributed.initialize()`); on a Cloud
      TPU slice the group is detected, elsewhere it is given by the next three
      arguments or their environment variables (`user_llm_jax.distributed`).
    coordinator_address: `host:port` of process 0 (e.g. 127.0.0.1:12345 on one machine).
    num_processes: number of processes of the run.
    process_id: this process's index.

  Returns:
    Whatever the job returns.
  """
  try:
    if config_file is not None:
      # The schema is the file's default config: drop a ':variant' suffix.
      schema = config_lib.load_config_file(config_file.partition(":")[0])
      config_lib.validate(config, schema)
    if "job" not in config:
      raise config_lib.ConfigError("config has no 'job' key naming the job to run; "
                                   f"registered jobs: {sorted(jobs.JOBS)}")
    try:
      job = jobs.resolve(config.job, mode)
    except KeyError as e:
      raise config_lib.ConfigError(str(e.args[0])) from e
    from user_llm_jax import distributed as distributed_lib  # pylint: disable=g-import-not-at-top
    try:
      group = distributed_lib.process_group(coordinator_address, num_processes, process_id)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from e
    if distributed or group.explicit:
      # Before anything touches a device: the backend must see the whole group.
      distributed_lib.initialize(group)
    _enable_compilation_cache()
    if not flags.FLAGS["verbosity"].present:
      # Orbax and Grain log every save/read at INFO; keep the console to the progress
      # bar and results unless --verbosity asks for more.
      absl_logging.set_verbosity(absl_logging.WARNING)
    from user_llm_jax import storage  # pylint: disable=g-import-not-at-top
    try:
      storage.check(workdir, "--workdir")  # gs:// needs its client package
    except storage.RemoteStorageError as e:
      raise config_lib.ConfigError(str(e)) from e
    storage.makedirs(workdir)
    logging.info("Running %s (mode=%s) in %s", config.job, mode, workdir)
    from user_llm_jax import sharding  # pylint: disable=g-import-not-at-top
    rules = config.mesh.rules if "mesh" in config and "rules" in config.mesh else ()
    try:
      context = sharding.axis_rules(rules)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from e
    # One rules table for the whole job: parameter placement and activation constraints.
    with context:
      return job(config, workdir)
  except _user_errors() as e:
    if isinstance(e, FileNotFoundError) and e.errno is not None:
      # Raised by the OS (a path the code built itself), not a message of ours naming
      # what the user should fix: a bug, so keep the traceback.
      raise
    sys.exit(f"error: {e}")


def _enable_compilation_cache() -> None:
  """Persistent XLA cache: repeated launches skip most compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
                          os.path.expanduser("~"), ".cache", "user_llm_jax_xla"))
