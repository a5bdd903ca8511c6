"""TFDS builder of user timelines: any registered dataset x protocol, array_record, no TensorFlow.

Build only through the Python API (the `tfds build` CLI and `tfds.load` need
TensorFlow):

  builder = UserTimelines(config=TimelineBuilderConfig.make("movielens"), data_dir=OUT)
  builder.download_and_prepare(  # file_format='array_record' is the builder's default
      download_config=tfds.download.DownloadConfig(manual_dir=RAW))

(`data_pipelines.prepare.prepare_dataset` does exactly this.) The output lives in
`OUT/user_timelines/<config name>/<version>/`, with `vocabulary.json` and
`statistics.json` beside TFDS's `dataset_info.json`. Both side files are written
into TFDS's temporary `incomplete.*` directory, which TFDS renames into place
only after every split is written, so a failed run never leaves a
complete-looking directory behind.

Records keep the timeline order (shuffling is the input pipeline's job), so under
leave-last-out record i of train, validation and test belong to the same user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import readers, timelines
from user_llm_jax.data import schema

STATISTICS_FILENAME = "statistics.json"
BUILDER_NAME = "user_timelines"
_VERSION = "1.0.0"

_MANUAL_INSTRUCTIONS = """\
Place the original files of the dataset in `manual_dir`:
  movielens: a GroupLens release directory: ratings.csv + movies.csv (ml-latest,
    ml-latest-small, ml-20m, ml-25m, ml-32m), ratings.dat + movies.dat (ml-1m, ml-10m) or
    u.data + u.item (+ u.genre) (ml-100k). https://grouplens.org/datasets/movielens/
  synthetic: the output of data_pipelines.synthetic.generate (MovieLens csv format).
  amazon: <Category>_5.json.gz / <Category>.json.gz + meta_<Category>.json.gz (2018) or
    reviews_<Category>_5.json.gz + meta_<Category>.json.gz (2014).
  google_local: review-<State>[_10].json.gz + meta-<State>.json.gz (2021).
"""


@dataclasses.dataclass(eq=False)
class TimelineBuilderConfig(tfds.core.BuilderConfig):
  """Which dataset, protocol and thresholds one prepared dataset uses.

  Attributes:
    dataset: reader name in `data_pipelines.readers.READERS`.
    protocol: 'leave_last_out' or 'paper'.
    window: paper protocol history length.
    stride: paper protocol window stride.
    min_item_count: item vocabulary threshold (train occurrences).
    min_category_count: category vocabulary threshold.
    max_bad_fraction: tolerated fraction of malformed raw lines.
    reader_options: sorted (key, value) pairs passed to the reader.
    kcore_users, kcore_items: k-core thresholds (0: off; see `timelines.TimelineOptions`).
    timestamp_precision: 'exact' or 'float32' (see `timelines.TimelineOptions`).
  """

  dataset: str = "movielens"
  protocol: str = "leave_last_out"
  window: int = 50
  stride: int = 1
  min_item_count: int = 1
  min_category_count: int = 1
  max_bad_fraction: float = 0.0
  reader_options: tuple[tuple[str, str], ...] = ()
  kcore_users: int = 0
  kcore_items: int = 0
  timestamp_precision: str = "exact"

  @classmethod
  def make(cls, dataset: str, protocol: str = "leave_last_out", window: int = 50,
           stride: int = 1, min_item_count: int = 1, min_category_count: int = 1,
           max_bad_fraction: float = 0.0, reader_options: dict | None = None,
           kcore_users: int = 0, kcore_items: int = 0,
           timestamp_precision: str = "exact") -> "TimelineBuilderConfig":
    """Builds a validated config whose name encodes every setting."""
    if protocol == "leave_last_out":  # window/stride do not apply: canonical values
      window, stride = 50, 1
    # A threshold of 1 keeps everything: the same data as 0, so the same name.
    kcore_users, kcore_items = (int(k) if int(k) > 1 else 0 for k in (kcore_users, kcore_items))
    timelines.TimelineOptions(protocol, window, stride, min_item_count, min_category_count,
                              kcore_users, kcore_items, timestamp_precision)
    readers.get_reader_class(dataset)  # fails early on an unknown dataset
    opts = tuple(sorted((str(k), str(v)) for k, v in (reader_options or {}).items()))
    name = f"{dataset}_{protocol}"
    if protocol == "paper":
      name += f"_w{window}_s{stride}"
    if min_item_count > 1 or min_category_count > 1:
      name += f"_min{min_item_count}-{min_category_count}"
    if kcore_users or kcore_items:
      name += f"_kcore{kcore_users}-{kcore_items}"
    if timestamp_precision != "exact":
      name += f"_ts{timestamp_precision}"
    if max_bad_fraction:
      name += f"_bad{max_bad_fraction:g}"
    if opts:
      name += "_" + hashlib.sha1(json.dumps(opts).encode()).hexdigest()[:8]
    return cls(name=name, dataset=dataset, protocol=protocol,
               window=window, stride=stride, min_item_count=min_item_count,
               min_category_count=min_category_count, max_bad_fraction=max_bad_fraction,
               reader_options=opts, kcore_users=kcore_users, kcore_items=kcore_items,
               timestamp_precision=timestamp_precision,
               description=f"{dataset} timelines, {protocol} protocol")

  def options(self) -> timelines.TimelineOptions:
    return timelines.TimelineOptions(self.protocol, self.window, self.stride,
                                     self.min_item_count, self.min_category_count,
                                     self.kcore_users, self.kcore_items,
                                     self.timestamp_precision)

  def settings(self) -> dict:
    """Everything that determines the output (compared for idempotent reuse).

    The k-core keys (and the timestamp precision) appear only when not at their default,
    so preparations made before the options existed keep matching their settings.
    """
    settings = {"dataset": self.dataset, "protocol": self.protocol, "window": self.window,
                "stride": self.stride, "min_item_count": self.min_item_count,
                "min_category_count": self.min_category_count,
                "max_bad_fraction": self.max_bad_fraction,
                "reader_options": [list(kv) for kv in self.reader_options]}
    if self.kcore_users or self.kcore_items:
      settings.update(kcore_users=self.kcore_users, kcore_items=self.kcore_items)
    if self.timestamp_precision != "exact":
      settings.update(timestamp_precision=self.timestamp_precision)
    return settings


def features() -> tfds.features.FeaturesDict:
  """The record features of `user_llm_jax/data/schema.py`."""
  seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
  return tfds.features.FeaturesDict({
      schema.USER_ID: tfds.features.Text(),
      schema.ITEM_IDS: seq(np.int32),
      schema.RATINGS: seq(np.int32),
      schema.TIMESTAMPS: seq(np.int64),
      schema.CATEGORY_IDS: seq(np.int32),
      schema.CATEGORY_LENGTHS: seq(np.int32),
      schema.REVIEW_TEXTS: seq(np.object_),
      schema.REVIEW_SUMMARIES: seq(np.object_),
      schema.FAVORITE_CATEGORY: tfds.features.Scalar(dtype=np.int32),
  })


class UserTimelines(tfds.core.GeneratorBasedBuilder):
  """Per-user event timelines of one dataset under one evaluation protocol."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Timeline schema with categories and review text."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
  BUILDER_CONFIGS = [TimelineBuilderConfig.make("movielens")]

  def __init__(self, *, config: TimelineBuilderConfig | str | None = None,
               show_progress: bool = True, **kwargs):
    self._show_progress = show_progress
    self.timelines: timelines.Timelines | None = None
    # TFDS refuses a config object named like a registered one: pass the name
    # (config names encode every setting, so equal names mean equal settings).
    if isinstance(config, TimelineBuilderConfig) and config.name in self.builder_configs:
      config = config.name
    # Set here, not in download_and_prepare: TFDS refuses to change the format of
    # an already initialised info (re-preparing over an existing dataset).
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        disable_shuffling=True,  # keep timeline order; aligned splits
        homepage="https://arxiv.org/abs/2402.13598",
        metadata=tfds.core.MetadataDict(settings=self.builder_config.settings()),
    )

  def _split_generators(self, dl_manager):
    config: TimelineBuilderConfig = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    tracker = readers.BadLineTracker(config.max_bad_fraction)
    reader = readers.make_reader(config.dataset, manual_dir, tracker=tracker,
                                 **dict(config.reader_options))
    tl = timelines.build_timelines(reader, config.options(), show_progress=self._show_progress)
    self.timelines = tl
    # self.data_dir is TFDS's temporary directory here: renamed into place on success.
    out_dir = os.fspath(self.data_dir)
    tl.vocabulary.save(os.path.join(out_dir, schema.VOCAB_FILENAME))
    write_statistics(os.path.join(out_dir, STATISTICS_FILENAME),
                     {**tl.statistics, "settings": config.settings()})
    return {split: self._generate_examples(split) for split in config.options().splits}

  def _generate_examples(self, split: str):
    assert self.timelines is not None
    yield from self.timelines.records(split)


def write_statistics(path: str, statistics: dict) -> None:
  """Writes the statistics JSON atomically (temp file then rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(statistics, f, indent=1, ensure_ascii=False, default=_json_default)
  os.replace(tmp, path)


def _json_default(obj):
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
