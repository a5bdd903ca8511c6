"""Tiny trained workdirs for the answering tests (`--mode=generate`, `--mode=infer`).

A User-LLM run and text-prompt baseline runs on the same prepared synthetic data, with the
`user_llm_movielens:smoke` models (a random tiny LLM with byte-level tokens, a tiny random
encoder): each trains in seconds on a CPU. Also a file of users' histories, the answers
file's lines, and absl flag values set for the duration of a job call.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import ml_collections
from absl import flags

from experiments.configs import user_llm_movielens
from user_llm_jax.data import schema
from user_llm_jax.jobs import text_baseline
from user_llm_jax.jobs import train_user_llm


def smoke_config(root: pathlib.Path, changes: dict[str, Any]) -> ml_collections.ConfigDict:
  """The smoke config reading the data prepared in `root/data`, with dotted-key `changes`."""
  config = user_llm_movielens.get_config("smoke")
  config.data.manual_dir = ""
  config.data.data_dir = str(root / "data")
  config.eval.shuffled_control = False
  config.update_from_flattened_dict(changes)
  return config


def user_llm_run(root: pathlib.Path, *, steps: int = 1, name: str = "run",
                 **changes: Any) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
  """(config, workdir) of a User-LLM trained `steps` steps in `root/name`.

  `changes` are config keys with '__' for '.' (`eval__exact_threshold=0`).
  """
  config = smoke_config(root, {"train.num_steps": steps, "train.checkpoint_every": steps,
                               "eval.num_examples": 1, **_dotted(changes)})
  workdir = root / name
  train_user_llm.run(config, str(workdir))
  return config, workdir


def text_baseline_run(root: pathlib.Path, *, strategy: str = "zero_shot", steps: int = 1,
                      name: str = "text", **changes: Any,
                      ) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
  """(config, workdir) of a text-prompt baseline run (`strategy`) in `root/name`."""
  config = smoke_config(root, {"job": "text_baseline", "baseline.strategy": strategy,
                               "train.num_steps": steps, "train.checkpoint_every": steps,
                               "eval.num_examples": 1, **_dotted(changes)})
  workdir = root / name
  text_baseline.run(config, str(workdir))
  return config, workdir


def _dotted(changes: dict[str, Any]) -> dict[str, Any]:
  return {k.replace("__", "."): v for k, v in changes.items()}


@contextlib.contextmanager
def flag_values(**values: Any):
  """Sets absl flags (parsing them first if needed) and restores them afterwards."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  before = {k: flags.FLAGS[k].value for k in values}
  try:
    for k, v in values.items():
      flags.FLAGS[k].value = v
    yield
  finally:
    for k, v in before.items():
      flags.FLAGS[k].value = v


def users_csv(vocab: schema.Vocabulary, path: pathlib.Path, users: int = 5) -> pathlib.Path:
  """A file of `users` users (u0, u1, ...), each with ids and one lower-case title."""
  items = vocab.items[schema.FIRST_ID:]
  rows = ["userId,movieId,title,rating,timestamp"]
  for u in range(users):
    for j in range(4):
      it = items[(u * 7 + j * 3) % len(items)]
      rows.append(f'u{u},,"{it.title.lower()}",4.0,{j}' if j == 1
                  else f"u{u},{it.raw_id},,3.5,{j}")
  path.write_text("\n".join(rows) + "\n")
  return path


def read_lines(path: pathlib.Path) -> list[dict[str, Any]]:
  """The JSON lines of an answers file."""
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
