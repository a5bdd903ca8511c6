"""What every training job does first: stale reports removed, train / mesh sections read."""

from __future__ import annotations

import jax
import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import trainer as trainer_lib


def mesh_from_config(mesh: ml_collections.ConfigDict, devices=None):
  """(device mesh, complete logical-axis rules) of a config's `mesh` section.

  `devices`: the devices to lay out (default: all local ones; the compile check passes a
  TPU topology's).

  `mesh.rules` entries replace `sharding.DEFAULT_RULES` entries by name (empty: the
  defaults); the launcher makes the same rules the active context for the whole job, so
  parameter placement and activation constraints read one table.

  Raises:
    ConfigError: a malformed rule (named).
  """
  device_mesh = sharding_lib.make_mesh(tuple(mesh.shape), tuple(mesh.axis_names), devices)
  try:
    rules = sharding_lib.normalize_rules(mesh.rules, where="mesh.rules")
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  return device_mesh, rules


def start(config: ml_collections.ConfigDict, workdir: str):
  """Removes a previous run's reports and reads the `train` and `mesh` sections.

  Returns:
    (TrainConfig, device mesh, logical-axis rules).

  Raises:
    ConfigError: a bad key of `train` (named).
  """
  summary_lib.remove_stale(workdir)
  train_cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, config.train, "train")
  mesh, rules = mesh_from_config(config.mesh)
  if train_cfg.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config key 'train.batch_size'={train_cfg.batch_size} must divide evenly over "
        f"{jax.process_count()} processes")
  return train_cfg, mesh, rules
