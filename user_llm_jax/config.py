"""Config validation: ConfigDict -> checked keys and types -> frozen dataclasses.

An experiment's `get_config()` (no argument) is the schema of that experiment: it defines
every legal key and its type. A run's config (a variant, plus command-line overrides) is
checked against it with `validate`, and each section is converted to its frozen dataclass
with `to_dataclass`, which checks the section against the dataclass fields. Every failure is
a `ConfigError` whose one-line message names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from user_llm_jax import storage


class ConfigError(ValueError):
  """An invalid config: unknown key, wrong type or value. The message names the key."""


def _type_name(t: Any) -> str:
  return getattr(t, "__name__", str(t))


def _schema_type(schema: ml_collections.ConfigDict, key: str) -> type | None:
  """Declared type of `schema[key]` (placeholders keep theirs); None: unconstrained."""
  field = schema._fields[key]  # pylint: disable=protected-access
  if isinstance(field, config_dict.FieldReference):
    return field.get_type()
  return None if field is None else type(field)


def _type_ok(value: Any, expected: type | None) -> bool:
  if expected is None or value is None:
    return True
  if expected is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, expected)


def validate(config: Mapping[str, Any], schema: Mapping[str, Any], path: str = "") -> None:
  """Checks that `config` has exactly the keys of `schema`, with compatible types.

  Args:
    config: the run's config (ConfigDict or nested dicts).
    schema: the experiment's reference config (`get_config()` with no argument).
    path: dotted prefix for messages.

  Raises:
    ConfigError: naming the first unknown, missing or mistyped key.
  """
  where = path.rstrip(".") or "<top level>"
  for key in config.keys():
    if key not in schema:
      raise ConfigError(
          f"unknown config key {path + key!r}; valid keys of {where}: "
          + ", ".join(sorted(schema.keys())))
  for key in schema.keys():
    if key not in config:
      raise ConfigError(f"config key {path + key!r} is missing (every key of the "
                        "experiment's get_config() must be present)")
    value, ref = config[key], schema[key]
    if isinstance(ref, (ml_collections.ConfigDict, dict)):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config key {path + key!r} must be a section with keys "
                          f"{sorted(ref.keys())}, got {value!r}")
      validate(value, ref, f"{path}{key}.")
      continue
    expected = (_schema_type(schema, key) if isinstance(schema, ml_collections.ConfigDict)
                else (None if ref is None else type(ref)))
    if not _type_ok(value, expected):
      raise ConfigError(f"config key {path + key!r} expects {_type_name(expected)}, got "
                        f"{type(value).__name__} {value!r}")


def _check_field_type(value: Any, hint: Any, name: str) -> Any:
  """Checks/coerces a value against a dataclass field annotation (simple types only)."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_field_type(value, arg, name)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"config key {name!r}: bad value {value!r}")
  base = origin or hint
  if base in (int, float, bool, str):
    if not _type_ok(value, base):
      raise ConfigError(f"config key {name!r} expects {base.__name__}, got "
                        f"{type(value).__name__} {value!r}")
    return float(value) if base is float else value
  if base in (tuple, list) or base is typing.Sequence:
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"config key {name!r} expects a sequence, got {value!r}")
    return tuple(value)
  return value  # Any, dtypes and other types: checked by the dataclass itself.


def to_dataclass(cls: type, section: Mapping[str, Any], path: str, *,
                 base: Any = None, skip_none: bool = True, **fixed: Any) -> Any:
  """Builds frozen dataclass `cls` from a config section.

  Args:
    cls: the dataclass.
    section: the config section (ConfigDict or dict).
    path: the section's dotted name, for messages (e.g. 'train').
    base: an instance of `cls` (a preset) whose fields fill the keys the section leaves
      at None; without it the dataclass defaults apply.
    skip_none: treat None values as "not set".
    **fixed: fields set by the caller (e.g. vocabulary sizes from the data), not config.

  Returns:
    The dataclass instance.

  Raises:
    ConfigError: unknown key, wrong type, or a value the dataclass rejects.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  values = {}
  for key, value in dict(section).items():
    if key not in fields or key in fixed:
      raise ConfigError(
          f"unknown config key '{path}.{key}'; valid keys: "
          + ", ".join(sorted(k for k in fields if k not in fixed)))
    if value is None and skip_none:
      continue
    values[key] = _check_field_type(value, hints[key], f"{path}.{key}")
  values.update(fixed)
  try:
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"invalid config section {path!r}: {e}") from e


def dataclass_section(cls: type, exclude: tuple[str, ...] = (),
                      **values: Any) -> ml_collections.ConfigDict:
  """A ConfigDict with one typed placeholder per dataclass field (None: use the preset).

  Lets a config file expose every field of an architecture dataclass for command-line
  override, typed so `--config.model.width=64` parses as an int, without repeating the
  preset's values.
  """
  out = ml_collections.ConfigDict()
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    hint = hints[f.name]
    t = hint if hint in (int, float, bool, str) else str
    out[f.name] = config_dict.placeholder(t)
  for k, v in values.items():
    out[k] = v
  return out


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file and returns `get_config(arg)`.

  Raises:
    ConfigError: the file is missing or has no `get_config`.
  """
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(
      f"_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  return module.get_config(arg) if arg is not None else module.get_config()


def to_plain(config: Any) -> Any:
  """A ConfigDict as plain JSON-able nested dicts/lists."""
  if isinstance(config, (ml_collections.ConfigDict, dict)):
    return {k: to_plain(v) for k, v in dict(config).items()}
  if isinstance(config, (tuple, list)):
    return [to_plain(v) for v in config]
  return config


# Config keys that cannot change what a run computes: reporting, parallelism, checkpoint
# cadence, caches. Everything else (data, models, seed, schedule, tasks) is part of a
# run's fingerprint. A resume after a change of one of these is allowed.
HARMLESS_KEYS = frozenset({
    "name", "eval", "mesh", "report_generation",
    "data.worker_count",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "llm.cache_dir",
    # Stacked (scanned) or unrolled layers and their remat policy give the same results
    # (tests/test_scan_layers.py), and checkpoints hold layers per layer in both forms.
    "llm.scan_layers", "llm.remat_policy",
    "encoder.model.scan_layers", "encoder.model.remat_policy",
    "aot",  # vocabulary sizes the compile check assumes; a run reads them from its data
})
# Keys added after runs were saved, at the values that reproduce those runs: left out of
# the fingerprint while they hold one, so the saved runs still match. Paths also cover the
# architecture facts jobs add (`encoder_architecture`, `architecture.encoder`); a config
# key left at None takes the preset's value, which is the old behaviour.
_ENCODER_ADDED = {"input_norm": (None, False), "init_std": (None, 0.0, 0),
                  "item_loss": (None, "softmax"), "item_negatives": (None, 256),
                  "negatives_per": (None, "step"),
                  "gbce_t": (None, 0.75), "item_bias": (None, True),
                  "repeat_bias": (None, False),
                  "loss_min_context": (None, 0), "norm_position": (None, "pre"),
                  "attention_dropout": (None, 0.0, 0)}
_BRIDGE_ADDED = {"item_head_skip": (False,), "item_head_skip_frozen": (False,),
                 "soft_prompt_norm": (False,),
                 "pooled_context": (False,), "standardize_states": (False,),
                 "category_text": (False,), "category_text_tokens": (8,),
                 "text_memory": (False,), "copy_head": (False,),
                 "copy_gate_init": (-2.0,)}
OMITTED_AT: dict[str, tuple[Any, ...]] = {
    "llm.param_dtype": ("float32",),
    "data.timestamp_precision": ("exact",),
    "data.text_categories": (0,),
    "data.max_text_categories": (0,),
    "data.train_through_validation": (False,),
    "align.content": ("titles",),
    "tasks.train_targets": ("last",),
    **{f"{section}.{key}": values for key, values in _BRIDGE_ADDED.items()
       for section in ("bridge", "architecture.bridge")},
    **{f"{section}.{key}": values for key, values in _ENCODER_ADDED.items()
       for section in ("encoder.model", "encoder_architecture", "architecture.encoder")},
}
# Keys that a run reads only while a sibling key has a value: left out of the fingerprint
# otherwise (a cross-attention run does not read the soft prompt's options, so runs saved
# before those options existed still match).
ONLY_WHEN: dict[str, tuple[str, Any]] = {
    f"{section}.soft_prompt_norm": ("mode", "soft_prompt")
    for section in ("bridge", "architecture.bridge")}
# Sections that are switched off while one of their keys is 0 (a stage that does not run):
# left out of the fingerprint then, so runs saved before the section existed still match.
OFF_WHEN_ZERO = {"align": "steps"}
# Keys holding filesystem paths: compared as absolute paths (remote URIs unchanged).
PATH_KEYS = frozenset({"data.manual_dir", "data.data_dir", "encoder.workdir"})


def fingerprint(config: Mapping[str, Any], *, drop: tuple[str, ...] = (),
                **extra: Any) -> dict[str, Any]:
  """The config keys that change a run's result, as a JSON-able nested dict.

  One function for every job: a checkpoint records it, and a resume compares it key by
  key (`train.checkpointing`), naming the first keys that differ.

  Args:
    config: the run's resolved config.
    drop: further dotted keys to leave out (keys a job does not read).
    **extra: facts to add that are not config keys (e.g. the encoder architecture read
      from the data).
  """
  harmless = HARMLESS_KEYS | set(drop)

  def walk(node: Any, prefix: str) -> Any:
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      out = {}
      for key, value in dict(node).items():
        path = f"{prefix}{key}"
        if path in harmless or omitted(path, value):
          continue
        if path in ONLY_WHEN and dict(node).get(ONLY_WHEN[path][0]) != ONLY_WHEN[path][1]:
          continue
        if (path in OFF_WHEN_ZERO and isinstance(value, (ml_collections.ConfigDict, dict))
            and not dict(value).get(OFF_WHEN_ZERO[path])):
          continue
        out[key] = walk(value, path + ".")
      return out
    path = prefix[:-1]
    if path in PATH_KEYS and isinstance(node, str) and node:
      # Local paths compare as absolute paths; a gs:// URI as written.
      return storage.absolute(node)
    return to_plain(node)

  plain = walk(config, "")
  plain.update(walk(to_plain(extra), ""))
  return plain


def omitted(path: str, value: Any) -> bool:
  """Whether a fingerprint leaves out `path` at `value` (`OMITTED_AT`)."""
  return path in OMITTED_AT and any(value == v and type(value) is type(v)
                                    for v in OMITTED_AT[path])


def differing_paths(a: Any, b: Any, prefix: tuple = ()) -> list[tuple]:
  """Key paths whose values differ between two nested mappings (e.g. two fingerprints).

  A key present on one side only differs, even when the other side's value is None (a
  config key added since a run was written is named, not hidden), unless today's
  fingerprint leaves it out at that value (`OMITTED_AT`: a run saved while the key was
  still recorded at its old-behaviour value).
  """
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for key in sorted(set(a) | set(b), key=str):
      path = (*prefix, key)
      if (key in a) != (key in b):
        if not omitted(dotted(path), a[key] if key in a else b[key]):
          out.append(path)
      else:
        out += differing_paths(a[key], b[key], path)
    return out
  return [] if a == b else [prefix]


def dotted(path: Sequence[Any]) -> str:
  """A key path as one dotted key ('data.window')."""
  return ".".join(map(str, path))


def differing_keys(a: Any, b: Any) -> list[str]:
  """`differing_paths` as dotted keys."""
  return [dotted(path) for path in differing_paths(a, b)]
