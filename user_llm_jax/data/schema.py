"""The on-disk contract between `data_pipelines/` (writer) and the library (reader).

Every prepared dataset (MovieLens, Amazon Review, Google Local, synthetic) is a set of
TFDS splits whose records are *event sequences* of one user. The **last event of a record is
its target**: the events before it are the history the model reads, the last one is what it
must predict (next item, its rating, its review text). A training record under the
leave-last-out protocol is `timeline[:-2]`, the validation record `timeline[:-1]`, the test
record the whole timeline; under the paper protocol every record is a window of
`window + 1` consecutive events. Autoregressive pretraining uses every position of a record.

Record features (names are the constants below):

  user_id            bytes   original user id of the raw dump
  item_ids           int32[L]   item vocabulary ids
  ratings            int32[L]   rating-token ids
  timestamps         int64[L]   seconds since the epoch
  category_ids       int32[sum(category_lengths)]  flat, per event in order
  category_lengths   int32[L]   how many categories each event's item has
  review_texts       bytes[L]   review text ('' when the dataset has none)
  review_summaries   bytes[L]   review summary / title ('' when none)
  favorite_category  int32      most frequent category id in the history (events[:-1]),
                                ties to the most recent; PAD_ID when the history has none

Every vocabulary (items, ratings, categories) reserves id 0 for padding and id 1 for
out-of-vocabulary values (e.g. an item that only occurs in a test target), so real values
start at `FIRST_ID`. The vocabularies are stored as `VOCAB_FILENAME` (JSON) next to the TFDS
`dataset_info.json` of the prepared dataset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from user_llm_jax import storage

PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2
VOCAB_FILENAME = "vocabulary.json"

USER_ID = "user_id"
ITEM_IDS = "item_ids"
RATINGS = "ratings"
TIMESTAMPS = "timestamps"
CATEGORY_IDS = "category_ids"
CATEGORY_LENGTHS = "category_lengths"
REVIEW_TEXTS = "review_texts"
REVIEW_SUMMARIES = "review_summaries"
FAVORITE_CATEGORY = "favorite_category"
# Set by `windows.RandomWindows` only: the index, in the user's whole history, of the
# record's first event (0 when the record starts at the user's first event).
WINDOW_START = "window_start"

SEQUENCE_FEATURES = (ITEM_IDS, RATINGS, TIMESTAMPS, CATEGORY_LENGTHS)
TEXT_SEQUENCE_FEATURES = (REVIEW_TEXTS, REVIEW_SUMMARIES)


@dataclasses.dataclass(frozen=True)
class ItemInfo:
  """One catalogue entry.

  Attributes:
    raw_id: the item's id in the raw dump (MovieLens movieId, Amazon asin, gmap_id).
    title: human-readable name, used as the LLM's answer for next-item prediction.
    category_ids: category vocabulary ids of the item (genres, leaf category, ...).
  """

  raw_id: str
  title: str
  category_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Id spaces of one prepared dataset.

  Index 0 and 1 of each list are the reserved `<pad>` and `<oov>` entries, so
  `items[i]` describes item id `i` and `len(items)` is the item vocabulary size.

  Attributes:
    dataset: name of the dataset family ('movielens', 'amazon', 'google_local', ...).
    items: catalogue entries indexed by item id.
    ratings: the rating value of each rating-token id (e.g. 0.5 ... 5.0).
    categories: category name of each category id.
    metadata: free-form provenance (protocol, window, source files, counts).
  """

  dataset: str
  items: tuple[ItemInfo, ...]
  ratings: tuple[float, ...]
  categories: tuple[str, ...]
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def num_items(self) -> int:
    return len(self.items)

  @property
  def num_ratings(self) -> int:
    return len(self.ratings)

  @property
  def num_categories(self) -> int:
    return len(self.categories)

  def to_json(self) -> dict:
    return {
        "dataset": self.dataset,
        "items": [[it.raw_id, it.title, list(it.category_ids)] for it in self.items],
        "ratings": list(self.ratings),
        "categories": list(self.categories),
        "metadata": self.metadata,
    }

  @classmethod
  def from_json(cls, obj: dict) -> "Vocabulary":
    return cls(
        dataset=obj["dataset"],
        items=tuple(ItemInfo(str(r), str(t), tuple(int(c) for c in cs))
                    for r, t, cs in obj["items"]),
        ratings=tuple(float(r) for r in obj["ratings"]),
        categories=tuple(str(c) for c in obj["categories"]),
        metadata=dict(obj.get("metadata", {})),
    )

  def save(self, path: str) -> None:
    """Writes the vocabulary as JSON, atomically (a local or gs:// path)."""
    storage.write_atomic(path, json.dumps(self.to_json(), ensure_ascii=False))

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    if not storage.exists(path):
      raise FileNotFoundError(
          f"Vocabulary file {path!r} not found: prepare the dataset first "
          "(python -m data_pipelines.prepare ...)."
      )
    try:
      obj = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); re-prepare the dataset.") from e
    return cls.from_json(obj)

  def titles(self) -> list[str]:
    """Titles of real items (ids FIRST_ID ...), in id order."""
    return [it.title for it in self.items[FIRST_ID:]]


def reserved_prefix(name: str) -> list[str]:
  """The two reserved entries that start every vocabulary list."""
  return [f"<pad:{name}>", f"<oov:{name}>"]


def split_categories(flat: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
  """Splits the flat `category_ids` feature into one list per event."""
  out, pos = [], 0
  for n in lengths:
    out.append(list(flat[pos:pos + n]))
    pos += n
  if pos != len(flat):
    raise ValueError(
        f"category_lengths sum to {pos} but category_ids has {len(flat)} entries")
  return out
