"""TensorBoard scalars through tensorboardX (no TensorFlow), written by process 0 only."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


class MetricsWriter:
  """Writes scalar metrics as TensorBoard event files under `logdir`.

  Args:
    logdir: directory of the event files (created if absent); None disables writing.
  """

  def __init__(self, logdir: str | None):
    self._writer = None
    if logdir is not None and jax.process_index() == 0:
      # Imported lazily: tensorboardX pulls in protobuf, which tests without a
      # workdir never need.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      value = float(np.asarray(value))
      if np.isfinite(value):
        self._writer.add_scalar(name, value, global_step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
