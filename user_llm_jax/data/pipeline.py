"""The online Grain input pipeline: prepared records -> batches of fixed-shape examples.

Order (the same on every host, so processes agree on what each one reads):

  source -> shuffle(seed) -> repeat(num_epochs) -> map(transforms)
         -> [pad to whole global batches, for evaluation] -> batch -> shard by process
         -> prefetch

Every stage is a lazy `grain.MapDataset` until prefetching, so the result is deterministic
(same seed, same order, with or without worker processes) and its iterator is
checkpointable: `iter(ds).get_state()/set_state()` or, inside an Orbax `Composite`,
`grain.checkpoint.CheckpointSave/CheckpointRestore`. Shuffling happens on the full
dataset with the same seed on every process.

Sharding by process cuts the stream into per-process batches and gives process p every
P-th one, starting at p: global batch j (the rows all processes feed to one step,
assembled by `jax.make_array_from_process_local_data`) is then exactly the j-th batch of
`batch_size * P` examples a single process would read, in the same order, so a
P-process run trains on the same batches (dropout masks included) as one process with
the same global batch. Every process is at the same local batch index after n steps,
so an iterator position saved by P processes means the same global batch for any P.

Evaluation (`pad_to_batch=True`, usually via `make_eval_pipeline`) reads one epoch in
order, padded to whole global batches with copies of a real example whose
`example_mask` is False: nothing is dropped, metrics skip the padding, and all
processes run the same number of steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from user_llm_jax.data import transforms as transforms_lib

Transform = grain.transforms.Map | Callable[[Any], Any]


class _PadToLength(grain.MapDataset):
  """Extends a dataset to `length` elements with masked copies of a template element."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, length: int, template: dict[str, Any]):
    super().__init__(parent)
    self._parent_length = len(parent)
    self._length = length
    padded = copy.deepcopy(template)
    padded[transforms_lib.EXAMPLE_MASK] = np.bool_(False)
    self._padded = padded

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index %= self._length
    if index < self._parent_length:
      return self._parent[index]
    return copy.deepcopy(self._padded)

  def __str__(self) -> str:
    return f"_PadToLength({self._parent_length} -> {self._length})"


@dataclasses.dataclass(frozen=True)
class _EnsureExampleMask(grain.transforms.Map):
  """Adds `example_mask=True` to dict examples that lack it (custom transforms)."""

  def map(self, element):
    if isinstance(element, dict) and transforms_lib.EXAMPLE_MASK not in element:
      element = dict(element)
      element[transforms_lib.EXAMPLE_MASK] = np.bool_(True)
    return element


def make_pipeline(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    transforms: Sequence[Transform],
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    pad_to_batch: bool = False,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Builds the batched, checkpointable input pipeline over a random-access source.

  Args:
    source: random-access records (`tfds.data_source`, `ListSource`, a list, ...).
    batch_size: examples per batch *on this process*.
    seed: shuffle seed; the same seed gives the same order.
    shuffle: shuffle globally (reshuffled every epoch).
    num_epochs: passes over the data; None repeats forever (training).
    transforms: grain Map transforms or callables applied in order to each record,
      typically `[CropAndPad(max_len, max_categories)]`.
    shard_index: this process's shard (default `jax.process_index()`, through
      `grain.sharding.ShardByJaxProcess`): it reads batches i, i + P, ...
    shard_count: number of shards P (default `jax.process_count()`).
    drop_remainder: drop a last partial batch (ignored when `pad_to_batch`).
    worker_count: Grain worker processes (0: in-process; > 0 needs parsed absl flags).
    pad_to_batch: pad to whole global batches (`batch_size * shard_count`) with examples
      whose `example_mask` is False (evaluation), so every shard reads the same number of
      full batches. Requires a finite `num_epochs`.
    read_options: thread prefetching of batches (default: 2 threads, 8 batches).

  Returns:
    A `grain.IterDataset` of dict batches with a leading batch axis.

  Raises:
    ValueError: on an empty source or inconsistent arguments.
  """
  by_process = grain.sharding.ShardByJaxProcess()
  shard_index = by_process.shard_index if shard_index is None else shard_index
  shard_count = by_process.shard_count if shard_count is None else shard_count
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if pad_to_batch and num_epochs is None:
    raise ValueError("pad_to_batch=True needs a finite num_epochs (evaluation reads once)")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  num_records = len(source)
  if num_records == 0:
    raise ValueError("the input source is empty: no records to read (was the dataset "
                     "prepared, and is the split name right?)")

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # reshuffles every epoch with a derived seed
  for transform in transforms:
    ds = ds.map(transform)
  ds = ds.map(_EnsureExampleMask())
  if pad_to_batch:
    global_batch = batch_size * shard_count
    ds = _PadToLength(ds, math.ceil(len(ds) / global_batch) * global_batch, ds[0])
    drop_remainder = False
  # Batch, then shard whole batches: shard i takes batches i, i + P, ... (module docstring).
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds[shard_index::shard_count]
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  it_ds = ds.to_iter_dataset(read_options)
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it_ds


def make_eval_pipeline(
    source: Sequence[Any],
    *,
    batch_size: int,
    transforms: Sequence[Transform],
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
  """One ordered pass over `source`, padded to whole batches (see `make_pipeline`).

  Every record appears exactly once over all shards with `example_mask` True; padding
  examples have `example_mask` False.
  """
  return make_pipeline(
      source, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
      transforms=transforms, shard_index=shard_index, shard_count=shard_count,
      drop_remainder=False, worker_count=worker_count, pad_to_batch=True)


def num_eval_batches(num_records: int, *, batch_size: int, shard_count: int = 1) -> int:
  """Batches each process reads from `make_eval_pipeline` over `num_records` records."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)
