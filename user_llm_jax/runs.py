"""A run's own description in its workdir: resolved config, model architectures, vocabulary.

Every training job calls `save_run` before it trains, so a workdir explains itself:

  WORKDIR/run.json            {"job", "config" (resolved, plain JSON), "architecture"}
  WORKDIR/vocabulary.json     the prepared dataset's vocabulary (ids <-> items, titles)
  WORKDIR/tokenizer/          the LLM's tokenizer (runs that have an LLM)
  WORKDIR/checkpoints/        Orbax steps; their metadata repeats config and architecture

Downstream jobs (the User-LLM job reading a pretrained encoder, `--mode=generate`) rebuild
the models with `load_run` + `models.*_from_architecture` and load the weights with
`checkpointing.restore_params`; they never read a report (`summary.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax import storage
from user_llm_jax.data import schema
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.train import checkpointing
from user_llm_jax.train import early_stopping

RUN_JSON = "run.json"
VOCABULARY_JSON = "vocabulary.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS = "checkpoints"
BEST_CHECKPOINTS = early_stopping.BEST_CHECKPOINTS


class NotARunError(FileNotFoundError):
  """A workdir holds no finished run of the expected kind."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A run read back from its workdir.

  Attributes:
    workdir: the run's directory.
    job: the job that wrote it.
    config: its resolved config.
    architecture: the frozen architectures of its models (`models.architecture`).
  """

  workdir: str
  job: str
  config: ml_collections.ConfigDict
  architecture: dict[str, Any]

  @property
  def checkpoints(self) -> str:
    """The checkpoints to load the run's model from: its best validation step's when the
    run selected one (`train.early_stopping`), else its latest."""
    best = os.path.join(self.workdir, BEST_CHECKPOINTS)
    return best if os.path.isdir(best) else os.path.join(self.workdir, CHECKPOINTS)

  def vocabulary(self) -> schema.Vocabulary:
    path = os.path.join(self.workdir, VOCABULARY_JSON)
    if not storage.exists(path):
      raise NotARunError(f"{self.workdir!r} has no {VOCABULARY_JSON}")
    return schema.Vocabulary.load(path)

  def tokenizer(self) -> Tokenizer:
    path = os.path.join(self.workdir, TOKENIZER_DIR, "tokenizer.json")
    if not storage.exists(path):
      raise NotARunError(f"{self.workdir!r} has no {TOKENIZER_DIR}/tokenizer.json (the run "
                         "has no LLM)")
    directory = os.path.dirname(path)
    if storage.is_remote(directory):
      # The tokenizers library reads local files only.
      directory = storage.download_dir(directory)
    return Tokenizer.from_tokenizer_json(directory)


def description(job: str, config: ml_collections.ConfigDict,
                architecture: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON a run records about itself (also stored in its checkpoints' metadata)."""
  return {"job": job, "config": config_lib.to_plain(config),
          "architecture": dict(architecture)}


def save_run(workdir: str, job: str, config: ml_collections.ConfigDict,
             architecture: Mapping[str, Any], *, vocab: schema.Vocabulary | None = None,
             tokenizer: Tokenizer | None = None) -> dict[str, Any]:
  """Writes `run.json` (and the vocabulary / tokenizer) into `workdir`; returns the record."""
  storage.makedirs(workdir)
  record = description(job, config, architecture)
  storage.write_atomic(os.path.join(workdir, RUN_JSON),
                       json.dumps(record, indent=2, default=str))
  if vocab is not None:
    vocab.save(os.path.join(workdir, VOCABULARY_JSON))
  if tokenizer is not None:
    if storage.is_remote(workdir):
      # The tokenizers library writes local files only: write them beside, then copy up.
      with tempfile.TemporaryDirectory() as local:
        tokenizer.save_tokenizer_json(local)
        storage.copy_tree(local, os.path.join(workdir, TOKENIZER_DIR))
    else:
      tokenizer.save_tokenizer_json(os.path.join(workdir, TOKENIZER_DIR))
  return record


def load_run(workdir: str, *, job: str | tuple[str, ...] | None = None,
             what: str = "run", make: str = "", checkpoint: bool = True) -> Run:
  """Reads the run in `workdir` (written by `save_run`) that has a checkpoint.

  Args:
    workdir: the run's directory.
    job: the job(s) that must have written it (None: any).
    what: what the caller needs, for messages ('trained User-LLM').
    make: the command that makes such a run, for messages.
    checkpoint: require a checkpoint (False: a run whose weights are not trained, e.g. a
      zero-shot text-prompt baseline).

  Raises:
    NotARunError: no run.json, a run of another job, or no checkpoint; the message says
      what to run first.
  """
  workdir = storage.absolute(workdir)
  hint = f"; make one with: {make}" if make else ""
  path = os.path.join(workdir, RUN_JSON)
  if not storage.exists(path):
    raise NotARunError(f"{workdir!r} holds no {what} (no {RUN_JSON}){hint}")
  record = json.loads(storage.read_text(path))
  jobs = (job,) if isinstance(job, str) else job
  if jobs is not None and record.get("job") not in jobs:
    raise NotARunError(f"{workdir!r} holds a {record.get('job')!r} run, not a {what}{hint}")
  if checkpoint and checkpointing.latest_step(os.path.join(workdir, CHECKPOINTS)) is None:
    raise NotARunError(f"{workdir!r} holds no trained {what} yet (no checkpoint in "
                       f"{CHECKPOINTS}/){hint}")
  return Run(workdir, record["job"], ml_collections.ConfigDict(record["config"]),
             dict(record.get("architecture", {})))
