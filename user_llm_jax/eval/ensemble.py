"""Several trained encoders ranking as one: the mean of their next-item log-probabilities.

Encoder runs that differ only in their seed (or in their architecture) make different
errors on the same split; ranking by the mean of their log-probabilities (a geometric mean
of their predictive distributions) averages part of those errors away. `EncoderEnsemble`
has the encoder's ranking contract (`next_item_logits(batch) -> [B, V]`, PAD and OOV
-inf), so every ranking evaluation of `eval.retrieval` and `eval.ranking` (the context
check, the first-order mix, the input-window control) reads it as it reads one encoder.

`load_runs` reads the members from encoder pretraining workdirs (each at its best
validation step when it selected one) and refuses runs prepared on different data: their
item ids would not name the same items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.train import checkpointing

ENCODER_JOB = "pretrain_encoder"
# Data keys that do not change which events a split holds or how a record is read.
_DATA_KEYS_FREE = ("worker_count", "data_dir")


class EncoderEnsemble(nnx.Module):
  """Ranks with the mean next-item log-probabilities of its member encoders.

  Args:
    members: trained `UserEncoder`s over the same catalogue (the same number of items).

  Raises:
    ValueError: no members, or members over catalogues of different sizes.
  """

  def __init__(self, members: Sequence[UserEncoder]):
    if not members:
      raise ValueError("an encoder ensemble needs at least one member")
    sizes = {m.cfg.num_items for m in members}
    if len(sizes) != 1:
      raise ValueError(f"ensemble members rank catalogues of different sizes {sorted(sizes)}")
    self.members = nnx.List(list(members))

  def next_item_logits(self, batch: Any) -> jax.Array:
    """float32 [B, V]: the members' mean log-softmax over the catalogue (PAD, OOV -inf)."""
    logp = [jax.nn.log_softmax(m.next_item_logits(batch), axis=-1) for m in self.members]
    return sum(logp[1:], logp[0]) / len(logp)


def _data_section(run: runs.Run) -> dict[str, Any]:
  data = config_lib.to_plain(run.config.data)
  return {k: v for k, v in data.items() if k not in _DATA_KEYS_FREE}


def check_same_data(members: Sequence[runs.Run]) -> None:
  """Raises a ConfigError naming the first `data` key on which a run differs from the first."""
  first = _data_section(members[0])
  for run in members[1:]:
    other = _data_section(run)
    for key in sorted(set(first) | set(other)):
      if first.get(key) != other.get(key):
        raise config_lib.ConfigError(
            f"encoder runs {members[0].workdir!r} and {run.workdir!r} differ in data.{key} "
            f"({first.get(key)!r} vs {other.get(key)!r}): an ensemble ranks one split, so "
            "its members must be trained on the same prepared data")


def load_runs(workdirs: Sequence[str]) -> tuple[EncoderEnsemble, list[runs.Run]]:
  """The ensemble of the encoder runs in `workdirs` (each restored from its best validation
  step's checkpoint when it kept one, else its latest) and the runs, first one first.

  Raises:
    runs.NotARunError: a workdir holds no trained encoder run.
    config.ConfigError: the runs were trained on different data.
  """
  if not workdirs:
    raise ValueError("name at least one encoder run")
  members = [runs.load_run(w, job=ENCODER_JOB, what="trained user encoder",
                           make="python -m experiments.main "
                                "--config=experiments/configs/encoder_movielens.py ...")
             for w in workdirs]
  check_same_data(members)
  vocab = members[0].vocabulary()
  encoders = []
  for run in members:
    if run.vocabulary() != vocab:
      raise config_lib.ConfigError(f"encoder run {run.workdir!r} has another vocabulary than "
                                   f"{members[0].workdir!r}: prepare both from the same files")
    encoder = models.build_encoder(models.encoder_config_from_architecture(run.architecture),
                                   int(run.config.seed))
    checkpointing.restore_params(encoder, run.checkpoints)
    encoders.append(encoder)
  return EncoderEnsemble(encoders), members


def config_of(members: Sequence[runs.Run]) -> ml_collections.ConfigDict:
  """The config the ensemble is evaluated under: the first run's (same data, by
  `check_same_data`; its `eval` keys set the batch size and the seen-items protocol)."""
  return members[0].config
