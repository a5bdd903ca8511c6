"""Grain transforms: one user's timeline record -> a fixed-shape encoder example.

A record (see `schema.py`) is one user's chronological events whose last event is the
target. `CropAndPad` keeps the most recent `max_len + 1` events and emits the
autoregressive pair `inputs = events[:-1]`, `targets = events[1:]`, right-padded to
`max_len`, so position `t` of the encoder reads events `0..t` and is trained to predict
event `t + 1`; the position `last_index` predicts the record's own target.

Time feature (`inputs_time`, int32 bucket ids): the gap between an input event and the
event before it in the record, bucketed on a log2 scale in minutes so that "same session",
"next day" and "months later" are distinct tokens:

  PAD_ID (0)              padding position
  OOV_ID (1)              the first event of the record (no earlier event is known)
  FIRST_ID + b, b >= 0    gap g seconds, b = min(floor(log2(1 + g / 60)), NUM_GAP_BUCKETS - 1)

Negative gaps (out-of-order timestamps) are clipped to 0. The time vocabulary size is
`NUM_TIME_BUCKETS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from user_llm_jax.data import schema

NUM_GAP_BUCKETS = 24  # 2**23 minutes is ~16 years: every real gap fits.
NUM_TIME_BUCKETS = schema.FIRST_ID + NUM_GAP_BUCKETS

# Keys of the example produced by `CropAndPad` (the encoder's batch contract).
INPUTS_ITEM = "inputs_item"
INPUTS_RATING = "inputs_rating"
INPUTS_CATEGORY = "inputs_category"
INPUTS_TIME = "inputs_time"
TARGETS_ITEM = "targets_item"
TARGETS_RATING = "targets_rating"
TARGETS_CATEGORY = "targets_category"
MASK = "mask"
LAST_INDEX = "last_index"
FAVORITE_CATEGORY = "favorite_category"
EXAMPLE_MASK = "example_mask"
# Emitted only for records that carry `schema.WINDOW_START` (random training windows).
CONTEXT_OFFSET = "context_offset"

EXAMPLE_KEYS = (INPUTS_ITEM, INPUTS_RATING, INPUTS_CATEGORY, INPUTS_TIME, TARGETS_ITEM,
                TARGETS_RATING, TARGETS_CATEGORY, MASK, LAST_INDEX, FAVORITE_CATEGORY,
                EXAMPLE_MASK)


def _user_name(record: dict[str, Any]) -> str:
  user = record.get(schema.USER_ID, b"<unknown>")
  if isinstance(user, bytes):
    user = user.decode("utf-8", errors="replace")
  return str(user)


def _feature(record: dict[str, Any], key: str, dtype) -> np.ndarray:
  if key not in record:
    raise KeyError(f"record of user {_user_name(record)!r} has no feature {key!r}; "
                   f"found {sorted(record)}")
  return np.asarray(record[key], dtype=dtype).reshape(-1)


def time_buckets(timestamps: np.ndarray) -> np.ndarray:
  """Bucket ids of the gap before each event (see the module docstring).

  Args:
    timestamps: int64[L] seconds since the epoch, chronological.

  Returns:
    int32[L]; the first event gets `OOV_ID`.
  """
  timestamps = np.asarray(timestamps, dtype=np.int64)
  out = np.full(timestamps.shape, schema.OOV_ID, dtype=np.int32)
  if timestamps.size > 1:
    gaps = np.maximum(np.diff(timestamps), 0).astype(np.float64)
    buckets = np.floor(np.log2(1.0 + gaps / 60.0)).astype(np.int64)
    out[1:] = schema.FIRST_ID + np.minimum(buckets, NUM_GAP_BUCKETS - 1)
  return out


def dense_categories(flat: np.ndarray, lengths: np.ndarray, max_categories: int) -> np.ndarray:
  """Ragged per-event categories -> int32[L, C], keeping the first C of each event.

  Vectorized: one gather of `flat` at `offset[e] + c` for every (event, slot).

  Args:
    flat: int32[sum(lengths)] category ids, event after event.
    lengths: int32[L] number of categories of each event.
    max_categories: C, slots per event; extra categories are dropped, missing ones PAD_ID.

  Returns:
    int32[L, C] category ids padded with `PAD_ID`.
  """
  lengths = np.asarray(lengths, dtype=np.int64)
  offsets = np.cumsum(lengths) - lengths                          # [L]
  slots = np.arange(max_categories)                               # [C]
  valid = slots[None, :] < lengths[:, None]                       # [L, C]
  index = offsets[:, None] + slots[None, :]                       # [L, C]
  if flat.size == 0:
    return np.full(valid.shape, schema.PAD_ID, dtype=np.int32)
  gathered = flat[np.minimum(index, flat.size - 1)]
  return np.where(valid, gathered, schema.PAD_ID).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CropAndPad(grain.transforms.Map):
  """Record -> fixed-shape next-event example (the encoder's input contract).

  Keeps the most recent `max_len + 1` events, splits them into inputs (`events[:-1]`)
  and targets (`events[1:]`) and right-pads both to `max_len`. Output features:

    inputs_item       int32[max_len]      item ids (PAD_ID past the end)
    inputs_rating     int32[max_len]      rating-token ids
    inputs_category   int32[max_len, C]   first C category ids of each event, PAD_ID-padded
    inputs_time       int32[max_len]      log2 gap bucket before each event (module doc)
    targets_item      int32[max_len]      item id of the next event
    targets_rating    int32[max_len]
    targets_category  int32[max_len, C]
    mask              bool[max_len]       valid input positions (a left-aligned prefix)
    last_index        int32               last valid position; its target is the record's
    favorite_category int32               the record's favorite-category label
    example_mask      bool                True (False only for eval padding examples)
    context_offset    int32               only when the record has `schema.WINDOW_START`
                                          (random windows): the user's events before the
                                          first input (0: position e's input context is
                                          the user's whole history up to it)

  Attributes:
    max_len: number of input positions (the paper's window, 50).
    max_categories: category slots per event. MovieLens movies have up to 10 genres, so
      the default keeps all of them; an item with more keeps its first `max_categories`.
  """

  max_len: int = 50
  max_categories: int = 10

  def __post_init__(self):
    if self.max_len < 1:
      raise ValueError(f"CropAndPad.max_len must be >= 1, got {self.max_len}")
    if self.max_categories < 1:
      raise ValueError(f"CropAndPad.max_categories must be >= 1, got {self.max_categories}")

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    items = _feature(element, schema.ITEM_IDS, np.int32)
    ratings = _feature(element, schema.RATINGS, np.int32)
    timestamps = _feature(element, schema.TIMESTAMPS, np.int64)
    cat_flat = _feature(element, schema.CATEGORY_IDS, np.int32)
    cat_lengths = _feature(element, schema.CATEGORY_LENGTHS, np.int32)
    length = items.size
    user = _user_name(element)
    for key, arr in ((schema.RATINGS, ratings), (schema.TIMESTAMPS, timestamps),
                     (schema.CATEGORY_LENGTHS, cat_lengths)):
      if arr.size != length:
        raise ValueError(f"record of user {user!r}: {key!r} has {arr.size} entries but "
                         f"{schema.ITEM_IDS!r} has {length}; every sequence feature must "
                         "have one entry per event")
    if int(cat_lengths.sum()) != cat_flat.size or (cat_lengths < 0).any():
      raise ValueError(f"record of user {user!r}: {schema.CATEGORY_LENGTHS!r} sums to "
                       f"{int(cat_lengths.sum())} but {schema.CATEGORY_IDS!r} has "
                       f"{cat_flat.size} entries")
    if length < 1:
      raise ValueError(f"record of user {user!r} has no events; prepared datasets never "
                       "write such records. Re-prepare the dataset with data_pipelines.prepare.")

    keep = min(length, self.max_len + 1)
    start = length - keep
    n = keep - 1                                                  # valid input positions
    # Work on the kept events only (records can be far longer than the window); the time
    # gaps also read the event just before the window, so the first kept event has one.
    before = max(start - 1, 0)
    times = time_buckets(timestamps[before:])[start - before:]                 # [keep]
    first_category = int(cat_lengths[:start].sum())
    categories = dense_categories(cat_flat[first_category:], cat_lengths[start:],
                                  self.max_categories)                         # [keep, C]

    def pad(x: np.ndarray) -> np.ndarray:
      out = np.full((self.max_len,) + x.shape[1:], schema.PAD_ID, dtype=np.int32)
      out[:n] = x
      return out

    inputs = slice(0, keep - 1)
    targets = slice(1, keep)
    items, ratings = items[start:], ratings[start:]
    example = {
        INPUTS_ITEM: pad(items[inputs]),
        INPUTS_RATING: pad(ratings[inputs]),
        INPUTS_CATEGORY: pad(categories[inputs]),
        INPUTS_TIME: pad(times[inputs]),
        TARGETS_ITEM: pad(items[targets]),
        TARGETS_RATING: pad(ratings[targets]),
        TARGETS_CATEGORY: pad(categories[targets]),
        MASK: np.arange(self.max_len) < n,
        LAST_INDEX: np.int32(max(n - 1, 0)),
        FAVORITE_CATEGORY: np.int32(element.get(schema.FAVORITE_CATEGORY, schema.PAD_ID)),
        # A one-event record (a 3-event user's leave-last-out train record) has no target:
        # it becomes an all-padding example that no loss or metric counts.
        EXAMPLE_MASK: np.bool_(n > 0),
    }
    if schema.WINDOW_START in element:
      example[CONTEXT_OFFSET] = np.int32(int(element[schema.WINDOW_START]) + start)
    return example
