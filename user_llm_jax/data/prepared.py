"""A config's `data` section -> prepared timelines on disk -> opened splits.

Every job reads its data through `load_splits(config.data, workdir)`:

  data.manual_dir set     the raw dump there is prepared (`data_pipelines.prepare`)
  data.manual_dir empty   the synthetic MovieLens-format dataset is generated into
                          WORKDIR/raw first (regenerated only when its settings change)

into `data.data_dir` (default WORKDIR/data), once; a later run with the same settings reuses
it. The result holds the train / validation (leave-last-out only) / test sources, the
vocabulary and the preparation statistics. `data.text_categories = k > 0` adds the review
summaries of at least k training events as per-event categories when the splits are opened
(`data/text_categories.py`; the prepared files are unchanged).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from typing import Any

import ml_collections

from data_pipelines import records
from user_llm_jax import config as config_lib
from user_llm_jax import distributed
from user_llm_jax import storage
from user_llm_jax.data import schema
from user_llm_jax.data import source as source_lib
from user_llm_jax.data import text_categories
from user_llm_jax.data import transforms as transforms_lib

SYNTHETIC_META = "synthetic_config.json"


def _synthetic_raw(data: ml_collections.ConfigDict, workdir: str) -> tuple[str, bool]:
  """Generates the synthetic dataset into WORKDIR/raw (reused if its settings match).

  Returns:
    (raw directory, whether it was (re)generated now).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  options = dict(data.synthetic)
  valid = set(inspect.signature(synthetic.generate).parameters) - {"out_dir"}
  unknown = sorted(set(options) - valid)
  if unknown:
    raise config_lib.ConfigError(
        f"unknown config key 'data.synthetic.{unknown[0]}'; synthetic.generate accepts: "
        + ", ".join(sorted(valid)))
  raw = os.path.join(workdir, "raw")
  meta_path = os.path.join(raw, SYNTHETIC_META)
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      if json.load(f) == options:
        return raw, False
  # Generate beside, then rename: an interrupted generation is never mistaken for data.
  tmp = raw + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  synthetic.generate(tmp, **options)
  with open(os.path.join(tmp, SYNTHETIC_META), "w", encoding="utf-8") as f:
    json.dump(options, f)
  shutil.rmtree(raw, ignore_errors=True)
  os.replace(tmp, raw)
  return raw, True


def prepare(data: ml_collections.ConfigDict, workdir: str) -> str:
  """Raw files (real `manual_dir` or the synthetic default) -> the prepared dataset's path.

  A remote `data_dir` (gs://; the default under a gs:// workdir) is prepared in a local
  staging directory (`storage.staging_dir`: the raw readers and the ArrayRecord writer need
  local files), then mirrored up unless the bucket already holds the same files; the
  returned path is the remote copy, which jobs read from the bucket.
  """
  from data_pipelines import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  force = False
  if data.manual_dir:
    if storage.is_remote(data.manual_dir):
      raise config_lib.ConfigError(
          f"config key 'data.manual_dir' is {data.manual_dir!r}: raw files are read from a "
          "local directory; copy them down first (gsutil -m cp -r), or prepare them locally "
          "and set data.data_dir to a gs:// path")
    manual_dir = os.path.abspath(os.path.expanduser(data.manual_dir))
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(
          f"config key 'data.manual_dir' points to {manual_dir!r}, which does not exist or "
          "is not a directory (expected the raw dataset files, e.g. ratings.csv and movies.csv)")
  else:
    local_workdir = storage.staging_dir(workdir) if storage.is_remote(workdir) else workdir
    manual_dir, force = _synthetic_raw(data, local_workdir)
  data_dir = data.data_dir or os.path.join(workdir, "data")
  local_data_dir = data_dir
  if storage.is_remote(data_dir):
    try:
      storage.check(data_dir, "config key 'data.data_dir'")
    except storage.RemoteStorageError as e:
      raise config_lib.ConfigError(str(e)) from e
    local_data_dir = storage.staging_dir(data_dir)
  options = {}
  for key in ("kcore_users", "kcore_items"):
    if key in data and data[key]:
      options[key] = int(data[key])
  options["timestamp_precision"] = str(data.get("timestamp_precision", "exact"))
  prepared = prepare_lib.prepare_dataset(
      data.dataset, manual_dir, local_data_dir, protocol=data.protocol, window=data.window,
      force=force, **options)
  if local_data_dir == data_dir:
    return prepared.path
  remote = os.path.join(data_dir, os.path.relpath(prepared.path, local_data_dir))
  storage.mirror(prepared.path, remote)
  return remote


@dataclasses.dataclass(frozen=True)
class Splits:
  """A prepared dataset opened for a job.

  Attributes:
    path: the prepared dataset directory.
    train, test: the splits' random-access record sources.
    validation: the validation split, or None (the paper protocol has none).
    vocab: the dataset's vocabulary.
    stats: the statistics written at preparation.
  """

  path: str
  train: Any
  test: Any
  validation: Any | None
  vocab: schema.Vocabulary
  stats: dict


def load_splits(data: ml_collections.ConfigDict, workdir: str) -> Splits:
  """Prepares `data` (or reuses it) and opens its splits.

  Raises:
    BadInputError: the train or the test split is empty.
  """
  # Process 0 prepares; the others then find it prepared instead of writing it too.
  path = distributed.primary_first(lambda: prepare(data, workdir), name="prepare_data")
  # Prepared data in a bucket is read from a local copy on each host (storage.local_copy).
  local = storage.local_copy(path) if storage.is_remote(path) else path
  train, vocab, stats = source_lib.load_prepared(local, "train")
  test, _, _ = source_lib.load_prepared(local, "test")
  try:
    validation = source_lib.load_prepared(local, "validation")[0]
  except KeyError:  # The paper protocol has no validation split.
    validation = None
  if len(train) == 0 or len(test) == 0:
    raise records.BadInputError(f"prepared dataset {path!r} has an empty split "
                                f"(train={len(train)}, test={len(test)} records)")
  min_count = int(data.get("text_categories", 0) or 0)
  if min_count:
    # Frequent review summaries as per-event categories (data/text_categories.py): the
    # vocabulary comes from the training records only.
    summary_map = text_categories.SummaryCategories(
        text_categories.frequent_summaries(
            train, min_count, int(data.get("max_text_categories", 0) or 0)),
        vocab.num_categories)
    train, test = (text_categories.MappedSource(s, summary_map) for s in (train, test))
    if validation is not None:
      validation = text_categories.MappedSource(validation, summary_map)
    vocab = summary_map.extend(vocab)
  return Splits(path, train, test, validation, vocab, stats)


def crop(data: ml_collections.ConfigDict) -> transforms_lib.CropAndPad:
  """The encoder's view of a record: the last `data.window` events, padded."""
  return transforms_lib.CropAndPad(data.window, data.max_categories)


def data_fingerprint(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `data` section as it identifies a run's input (absolute paths, no parallelism)."""
  wrapper = ml_collections.ConfigDict({"data": data.to_dict()})
  return config_lib.fingerprint(wrapper)["data"]
