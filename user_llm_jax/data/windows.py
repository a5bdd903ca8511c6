"""Training on a user's whole history: random windows of events as a random-access source.

`CropAndPad` reads the last `window + 1` events of a record, so a training record longer
than that contributes only its most recent events, every epoch the same ones (a MovieLens
user with 500 ratings trains on 51 of them). `RandomWindows` wraps the training split
instead: each user appears `ceil((events - 1) / window)` times per pass (as many windows
as it takes to cover the history, so every interaction weighs the same, as in the
recommender-systems protocol of one example per interaction), and each appearance is a
window of `window + 1` consecutive events ending at a random position. Randomness comes
from (seed, index) alone: the source is deterministic, random-access and lazy, so the
Grain pipeline over it shuffles, resumes from a checkpointed position and shards as over
any source. Evaluation keeps the last-events view (the target is the last event).
Every window carries `schema.WINDOW_START`, where it starts in the user's history, from
which `CropAndPad` tells how much of each position's real history the window holds
(`transforms.CONTEXT_OFFSET`; `EncoderConfig.loss_min_context` reads it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from user_llm_jax.data import schema

# Per-event features sliced with the events; categories are ragged (sliced by offsets).
_PER_EVENT = (schema.ITEM_IDS, schema.RATINGS, schema.TIMESTAMPS, schema.CATEGORY_LENGTHS,
              schema.REVIEW_TEXTS, schema.REVIEW_SUMMARIES)


def slice_events(record: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
  """The record restricted to events `start:end` (the last kept event is its target).

  Args:
    record: a timeline record (`schema`): per-event arrays and ragged categories.
    start, end: event indices, 0 <= start < end <= number of events.

  Returns:
    A record of the same keys; non-event keys (user id, favorite category) unchanged.
  """
  lengths = np.asarray(record[schema.CATEGORY_LENGTHS], np.int64).reshape(-1)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  out = dict(record)
  for key in _PER_EVENT:
    if key in record:
      out[key] = np.asarray(record[key])[start:end]
  out[schema.CATEGORY_IDS] = np.asarray(record[schema.CATEGORY_IDS])[
      offsets[start]:offsets[end]]
  return out


def drop_event(record: Mapping[str, Any], index: int) -> dict[str, Any]:
  """The record without its event `index` (0 <= index < number of events).

  Non-event keys are unchanged; the ragged categories lose that event's ids.
  """
  lengths = np.asarray(record[schema.CATEGORY_LENGTHS], np.int64).reshape(-1)
  if not 0 <= index < lengths.size:
    raise IndexError(f"drop_event: event {index} of a record with {lengths.size} events")
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  out = dict(record)
  for key in _PER_EVENT:
    if key in record:
      out[key] = np.delete(np.asarray(record[key]), index, axis=0)
  out[schema.CATEGORY_IDS] = np.delete(np.asarray(record[schema.CATEGORY_IDS]),
                                       np.arange(offsets[index], offsets[index + 1]))
  return out


class RandomWindows(Sequence):
  """A training split seen as random windows of `window + 1` events (module docstring).

  Args:
    source: the training split (random access, e.g. a `tfds` data source).
    window: input events per example (`data.window`); a window holds `window + 1` events,
      plus the event before it when there is one (the first input's time gap reads it).
    seed: seed of the window positions.
    passes: passes over the data the index space spans (windows differ between passes;
      the pipeline repeats the whole range after that).
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], window: int, *, seed: int,
               passes: int = 1000):
    if window < 1:
      raise ValueError(f"RandomWindows.window must be >= 1, got {window}")
    if passes < 1:
      raise ValueError(f"RandomWindows.passes must be >= 1, got {passes}")
    self.source = source
    self.window = window
    self.seed = seed
    self.passes = passes
    lengths = np.array([np.asarray(source[i][schema.ITEM_IDS]).size
                        for i in range(len(source))], np.int64)
    copies = np.maximum(1, -(-(lengths - 1) // window))
    self.lengths = lengths
    self._users = np.repeat(np.arange(len(source)), copies)   # one entry per window a pass

  @property
  def windows_per_pass(self) -> int:
    return int(self._users.size)

  def __len__(self) -> int:
    return self.windows_per_pass * self.passes

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"window {index} out of range [0, {len(self)})")
    index %= len(self)
    user = int(self._users[index % self.windows_per_pass])
    record = self.source[user]
    n = int(self.lengths[user])
    keep = self.window + 1
    if n <= keep:
      return {**record, schema.WINDOW_START: 0}
    rng = np.random.default_rng((self.seed, index))
    end = int(rng.integers(keep, n + 1))                       # window = events[end-keep:end]
    start = max(end - keep - 1, 0)
    return {**slice_events(record, start, end), schema.WINDOW_START: start}

