"""Random-access sources of prepared timeline records (the library side of the data contract).

`load_prepared` opens a dataset written by `data_pipelines.prepare` (TFDS
array_record, read with `as_data_source`, no TensorFlow) together with its
vocabulary and statistics. Records come back as dicts of numpy arrays / bytes
following `user_llm_jax/data/schema.py`. `ListSource` is an in-memory
equivalent for tests and small experiments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from user_llm_jax import storage
from user_llm_jax.data import schema

STATISTICS_FILENAME = "statistics.json"
DATASET_INFO = "dataset_info.json"


def find_prepared_dir(data_dir: str | os.PathLike) -> str:
  """Resolves `data_dir` to the directory holding one prepared dataset.

  Accepts the dataset's own directory (the one with `dataset_info.json`) or a
  TFDS data root holding exactly one prepared dataset
  (`root/<builder>/<config>/<version>/`).

  Raises:
    FileNotFoundError: nothing prepared there, or several candidates.
  """
  data_dir = os.fspath(data_dir)
  if storage.exists(os.path.join(data_dir, DATASET_INFO)):
    return data_dir
  if not storage.isdir(data_dir):
    raise FileNotFoundError(
        f"data_dir {data_dir!r} does not exist; prepare a dataset first with "
        "python -m data_pipelines.prepare --dataset=... --manual_dir=... --data_dir=...")
  found = sorted(
      os.path.dirname(p) for pattern in ("*/*/*/" + DATASET_INFO, "*/*/" + DATASET_INFO)
      for p in storage.glob(data_dir, pattern) if "incomplete" not in p)
  if len(found) == 1:
    return found[0]
  if not found:
    raise FileNotFoundError(
        f"no prepared dataset in {data_dir!r} (no {DATASET_INFO} found; an "
        "'incomplete.*' directory is a preparation that did not finish). Run "
        "python -m data_pipelines.prepare --dataset=... --manual_dir=... --data_dir=...")
  raise FileNotFoundError(
      f"{data_dir!r} holds {len(found)} prepared datasets; pass one of them:\n  "
      + "\n  ".join(found))


def load_statistics(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, STATISTICS_FILENAME)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path!r} not found: {prepared_dir!r} was not written by "
                            "data_pipelines.prepare; re-prepare the dataset.")
  return json.loads(storage.read_text(path))


def load_prepared(data_dir: str | os.PathLike, split: str):
  """Opens one split of a prepared dataset for random access.

  Args:
    data_dir: the prepared dataset's directory or a data root holding one.
    split: 'train', 'validation' (leave-last-out only) or 'test'.

  Returns:
    (source, vocabulary, statistics): `source` supports `len()` and integer
    indexing and returns schema record dicts; `vocabulary` is the
    `schema.Vocabulary`; `statistics` the preparation report (dict).

  Raises:
    FileNotFoundError: no prepared dataset at `data_dir`.
    KeyError: the split does not exist (e.g. 'validation' under the paper protocol).
  """
  import tensorflow_datasets as tfds  # heavy import, only when reading

  prepared = find_prepared_dir(data_dir)
  vocabulary = schema.Vocabulary.load(os.path.join(prepared, schema.VOCAB_FILENAME))
  statistics = load_statistics(prepared)
  builder = tfds.builder_from_directory(prepared)
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise KeyError(f"split {split!r} not in the prepared dataset {prepared!r}; "
                   f"available: {splits}")
  source = builder.as_data_source(split=split)
  return source, vocabulary, statistics


class ListSource(Sequence):
  """An in-memory random-access source of schema records (for tests and tiny data)."""

  def __init__(self, records: Sequence[dict]):
    missing = [k for k in (schema.ITEM_IDS, schema.RATINGS, schema.TIMESTAMPS,
                           schema.CATEGORY_IDS, schema.CATEGORY_LENGTHS)
               if records and k not in records[0]]
    if missing:
      raise KeyError(f"ListSource records lack schema features {missing}")
    self._records = [_normalise(r) for r in records]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._records[i] for i in range(*index.indices(len(self)))]
    return self._records[index]

  def __repr__(self) -> str:
    return f"ListSource(num_records={len(self)})"


def _normalise(record: dict) -> dict:
  """Gives a record the dtypes a prepared source returns (missing text -> b'')."""
  n = len(record[schema.ITEM_IDS])
  out = {
      schema.USER_ID: _to_bytes(record.get(schema.USER_ID, b"")),
      schema.ITEM_IDS: np.asarray(record[schema.ITEM_IDS], np.int32),
      schema.RATINGS: np.asarray(record[schema.RATINGS], np.int32),
      schema.TIMESTAMPS: np.asarray(record[schema.TIMESTAMPS], np.int64),
      schema.CATEGORY_IDS: np.asarray(record[schema.CATEGORY_IDS], np.int32),
      schema.CATEGORY_LENGTHS: np.asarray(record[schema.CATEGORY_LENGTHS], np.int32),
      schema.FAVORITE_CATEGORY: np.int32(record.get(schema.FAVORITE_CATEGORY,
                                                    schema.PAD_ID)),
  }
  for key in schema.TEXT_SEQUENCE_FEATURES:
    texts = record.get(key, [b""] * n)
    out[key] = np.array([_to_bytes(t) for t in texts], dtype=object)
  for key in schema.SEQUENCE_FEATURES:
    if len(out[key]) != n:
      raise ValueError(f"record feature {key!r} has length {len(out[key])}, expected {n}")
  if int(out[schema.CATEGORY_LENGTHS].sum()) != len(out[schema.CATEGORY_IDS]):
    raise ValueError("category_lengths do not sum to len(category_ids)")
  return out


def _to_bytes(x) -> bytes:
  return x if isinstance(x, bytes) else str(x).encode("utf-8")
