"""Orbax save/restore of an imported decoder, so later runs skip GGUF/safetensors conversion.

Layout of a saved directory:
  llm_config.json    the LlmConfig (architecture) as JSON
  params/            Orbax StandardCheckpointer tree of the float32 parameters
  tokenizer.json     (+ tokenizer_config.json) when a tokenizer was saved alongside

Restoring builds the structure with `nnx.eval_shape` and reads every array straight into
its final sharding when a mesh is given (no unsharded copy on one device).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from user_llm_jax import layer_scan
from user_llm_jax import sharding
from user_llm_jax.llm.config import LlmConfig
from user_llm_jax.llm.model import Decoder

CONFIG_FILE = "llm_config.json"
PARAMS_DIR = "params"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
  """True when `path` looks like a directory written by `save_decoder`."""
  path = pathlib.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_decoder(model: Decoder, directory: str | os.PathLike, tokenizer=None) -> None:
  """Saves `model`'s parameters (and optionally its tokenizer) to `directory`.

  The parameter tree is written first and the config last, so a directory with a config
  always has complete parameters (`is_checkpoint_dir` is false after a crash mid-save).
  """
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).unlink(missing_ok=True)
  # Per-layer layout whether or not the layers are stacked, so any form restores it.
  state = layer_scan.unstack_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                  frozenset({"layers"}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / PARAMS_DIR, state, force=True)
    ckptr.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save_tokenizer_json(directory)
  tmp = directory / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2))
  os.replace(tmp, directory / CONFIG_FILE)


def read_config(directory: str | os.PathLike) -> LlmConfig:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: not an LLM checkpoint ({CONFIG_FILE} missing)")
  try:
    return LlmConfig.from_dict(json.loads(path.read_text()))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: invalid LLM config: {e}") from e


def restore_decoder(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    rules: sharding.Rules | None = None, **overrides) -> Decoder:
  """Restores a decoder saved by `save_decoder`.

  Args:
    directory: the saved directory.
    mesh: place parameters on this mesh by their logical axes (default: one device).
    rules: logical-axis rules used with `mesh`; None reads the active ones
      (`sharding.axis_rules`).
    **overrides: non-architectural LlmConfig changes (e.g. dtype='bfloat16').

  Raises:
    FileNotFoundError / ValueError: missing directory or a checkpoint that does not match
      its config (the message names the parameter).
  """
  directory = pathlib.Path(directory).absolute()
  cfg = read_config(directory)
  if overrides:
    cfg = cfg.replace(**overrides)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if mesh is not None:
    table = sharding.active_rules() if rules is None else rules
    place = lambda var: sharding.variable_sharding(var, mesh, table)  # noqa: E731
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = lambda var: device  # noqa: E731
  target = nnx.to_pure_dict(jax.tree.map(
      lambda var: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=place(var))),
      nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(directory / PARAMS_DIR, target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ValueError(f"{directory}: parameters do not match {CONFIG_FILE}: {e}") from e
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
