"""Timeline records + vocabulary -> tokenized LLM task examples (Grain transforms).

One example = one (record, task) pair. Its text is the task's fixed prompt followed by the
answer and the end-of-turn token, right-padded to a static length:

  tokens     int32[L]  [prompt][answer][<|im_end|>][pad ...]      L = max_prompt + max_answer + 1
  loss_mask  bool[L]   True on the answer and end tokens only (answer-only loss)
  text_mask  bool[L]   True on real tokens

plus the encoder's features of the same history (`data.transforms.CropAndPad`: the events
before the record's target, the most recent `window` of them) and bookkeeping:
`prompt_length`, `answer_length`, `task_id`, `target_item`, `label` (favorite category id),
`has_answer` (False when the record has no answer for the task, e.g. an out-of-vocabulary
target item; such examples train nothing and count as misses in evaluation).

For the text-prompt baseline (`ExampleConfig.history_tokens > 0`) the same history is also
rendered as text inside the prompt, most recent events first to be kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.data import windows as windows_lib
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import prompts

TOKENS = "tokens"
LOSS_MASK = "loss_mask"
TEXT_MASK = "text_mask"
PROMPT_LENGTH = "prompt_length"
ANSWER_LENGTH = "answer_length"
TASK_ID = "task_id"
TARGET_ITEM = "target_item"
LABEL = "label"
HAS_ANSWER = "has_answer"
TASK = "task"  # key added by `TaskSource` to each record


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """Shapes and contents of the task examples.

  Attributes:
    tasks: tasks to pose (subset of `prompts.TASKS`).
    window: events the encoder reads (E).
    max_categories: category slots per event (encoder input).
    max_prompt_tokens: longest prompt; a longer one is an error (raise it, or lower the
      history budget).
    max_answer_tokens: answers are cut to this many tokens (the end token comes after).
    history_tokens: > 0: text-prompt baseline, the history rendered within this many
      tokens is part of the prompt; 0: User-LLM (the prompt carries no history).
    review_field: 'summary' or 'text', the review task's answer.
    dataset: dataset family, for the prompts' wording.
    next_item_titles: next-item examples carry the target's title as the answer (the
      generative path). False: the prompt alone, for a User-LLM whose item head ranks the
      catalogue from the prompt's last state (shorter sequences, no title decoding).
  """

  tasks: tuple[str, ...] = (prompts.NEXT_ITEM, prompts.FAVORITE_CATEGORY)
  window: int = 50
  max_categories: int = 10
  max_prompt_tokens: int = 64
  max_answer_tokens: int = 24
  history_tokens: int = 0
  review_field: str = "summary"
  dataset: str = "movielens"
  next_item_titles: bool = True

  def __post_init__(self):
    unknown = [t for t in self.tasks if t not in prompts.TASKS]
    if unknown or not self.tasks:
      raise ValueError(f"tasks {tuple(self.tasks)}: unknown {unknown}; choose from "
                       f"{prompts.TASKS}")
    if self.review_field not in ("summary", "text"):
      raise ValueError(f"review_field must be 'summary' or 'text', got {self.review_field!r}")
    for name in ("window", "max_categories", "max_prompt_tokens", "max_answer_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"ExampleConfig.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def text_length(self) -> int:
    return self.max_prompt_tokens + self.max_answer_tokens + 1

  @property
  def spec(self) -> prompts.PromptSpec:
    return prompts.PromptSpec(dataset=self.dataset)


# Training targets of a record (`tasks.train_targets`).
TRAIN_TARGETS = ("last", "all")
# The tasks whose answer is the target event itself (its item, its review), so that any
# event of a training record can be one; the favorite category's label counts the whole
# record's history at preparation time and is defined at its last event only.
PER_EVENT_TASKS = (prompts.NEXT_ITEM, prompts.REVIEW)


class TaskSource(Sequence):
  """Random-access (record, task) training pairs.

  With `targets='last'` element i is record i // n with task i % n (n tasks): each record
  teaches its last event, as it is evaluated. With `targets='all'` every event of a record
  that has at least one event before it is a target of the per-event tasks
  (`PER_EVENT_TASKS`: next item, review) once per pass, the record cut to end there (the
  events before it are the history, `CropAndPad` keeps the last window of them); the
  favorite category keeps its one example per record. A short-history dataset (Amazon
  5-core: about 4.5 training events per user) then trains on every review its users
  wrote instead of one per user. The enumeration is deterministic; the pipeline shuffles.

  Args:
    records: the training split (random access).
    tasks: the task names.
    indices: the records to use (default: all).
    targets: 'last' or 'all'.
  """

  def __init__(self, records: Sequence[Any], tasks: Sequence[str],
               indices: Sequence[int] | None = None, *, targets: str = "last"):
    if targets not in TRAIN_TARGETS:
      raise ValueError(f"tasks.train_targets={targets!r}: must be one of {TRAIN_TARGETS}")
    self.records = records
    self.tasks = tuple(tasks)
    self.indices = list(range(len(records))) if indices is None else list(indices)
    self._pairs = None
    if targets == "all":
      # (record, task, end): the record's events [:end], the last of them the target;
      # end None for the whole record.
      pairs = []
      for r in self.indices:
        n = int(np.asarray(records[r][schema.ITEM_IDS]).size)
        for task in self.tasks:
          ends = range(2, n) if task in PER_EVENT_TASKS else ()
          pairs.extend((r, task, end) for end in ends)
          pairs.append((r, task, None))
      self._pairs = pairs

  def __len__(self) -> int:
    if self._pairs is not None:
      return len(self._pairs)
    return len(self.indices) * len(self.tasks)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(f"TaskSource index {i} out of range [0, {len(self)})")
    if self._pairs is None:
      record = dict(self.records[self.indices[i // len(self.tasks)]])
      record[TASK] = self.tasks[i % len(self.tasks)]
      return record
    r, task, end = self._pairs[i]
    record = dict(self.records[r])
    if end is not None:
      record = windows_lib.slice_events(record, 0, end)
    record[TASK] = task
    return record


def text_of(value: Any) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskExample(grain.transforms.Map):
  """A `TaskSource` element -> a fixed-shape task example (see the module docstring).

  Attributes:
    vocab: the prepared dataset's vocabulary (titles, rating values, category names).
    tokenizer: the LLM's tokenizer.
    cfg: example shapes and contents.
  """

  vocab: schema.Vocabulary
  tokenizer: Tokenizer
  cfg: ExampleConfig

  @property
  def crop(self) -> transforms_lib.CropAndPad:
    return transforms_lib.CropAndPad(self.cfg.window, self.cfg.max_categories)

  def history_events(self, record: dict[str, Any]) -> list[str]:
    """The rendered events the encoder reads (history of the target), oldest first."""
    items = np.asarray(record[schema.ITEM_IDS]).reshape(-1)
    ratings = np.asarray(record[schema.RATINGS]).reshape(-1)
    cats = schema.split_categories(np.asarray(record[schema.CATEGORY_IDS]).reshape(-1),
                                   np.asarray(record[schema.CATEGORY_LENGTHS]).reshape(-1))
    n = items.size
    start = n - min(n, self.cfg.window + 1)
    out = []
    for e in range(start, n - 1):
      title = self.vocab.items[int(items[e])].title if items[e] < self.vocab.num_items else ""
      rating = (self.vocab.ratings[int(ratings[e])]
                if schema.FIRST_ID <= ratings[e] < self.vocab.num_ratings else None)
      names = [self.vocab.categories[c] for c in cats[e][:self.cfg.max_categories]
               if schema.FIRST_ID <= c < self.vocab.num_categories]
      out.append(prompts.render_event(title, rating, names))
    return out

  def _rendered_history(self, record: dict[str, Any]) -> tuple[str, int] | None:
    """(history text, events it shows), or None without a history budget."""
    if self.cfg.history_tokens <= 0:
      return None
    return prompts.render_history(self.history_events(record), self.tokenizer,
                                  self.cfg.history_tokens)

  def history_text(self, record: dict[str, Any]) -> str | None:
    rendered = self._rendered_history(record)
    return rendered[0] if rendered is not None else None

  def events_shown(self, record: dict[str, Any]) -> int:
    """How many of the most recent history events the prompt shows (0: no history text)."""
    rendered = self._rendered_history(record)
    return rendered[1] if rendered is not None else 0

  def answer_text(self, record: dict[str, Any], task: str) -> str | None:
    """The reference answer of `task` for `record`, or None when there is none."""
    if task == prompts.NEXT_ITEM:
      item = int(np.asarray(record[schema.ITEM_IDS]).reshape(-1)[-1])
      return self.vocab.items[item].title if schema.FIRST_ID <= item < self.vocab.num_items \
          else None
    if task == prompts.FAVORITE_CATEGORY:
      label = int(record.get(schema.FAVORITE_CATEGORY, schema.PAD_ID))
      return self.vocab.categories[label] if schema.FIRST_ID <= label < \
          self.vocab.num_categories else None
    answers = self.review_answers(record)
    return (answers[-1] if answers else "") or None

  def review_answers(self, record: dict[str, Any]) -> list[str]:
    """Each event's review answer (`review_field`), stripped; '' where it has none."""
    key = schema.REVIEW_SUMMARIES if self.cfg.review_field == "summary" else schema.REVIEW_TEXTS
    texts = record.get(key)
    if texts is None:
      return []
    return [text_of(t).strip() for t in np.asarray(texts, dtype=object).reshape(-1)]

  def prompt(self, record: dict[str, Any], task: str) -> list[int]:
    """Prompt tokens of (record, task); raises if longer than `max_prompt_tokens`."""
    item_name, rating = "", 0.0
    if task == prompts.REVIEW:
      item = int(np.asarray(record[schema.ITEM_IDS]).reshape(-1)[-1])
      item_name = self.vocab.items[item].title if item < self.vocab.num_items else ""
      r = int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])
      rating = self.vocab.ratings[r] if schema.FIRST_ID <= r < self.vocab.num_ratings else 0.0
    ids = prompts.prompt_tokens(self.tokenizer, self.cfg.spec, task,
                                history_text=self.history_text(record),
                                item_name=item_name, rating=rating)
    if len(ids) > self.cfg.max_prompt_tokens:
      user = text_of(record.get(schema.USER_ID, b"?"))
      raise ValueError(
          f"user {user!r}, task {task!r}: the prompt has {len(ids)} tokens but "
          f"max_prompt_tokens is {self.cfg.max_prompt_tokens}; raise "
          "tasks.max_prompt_tokens or lower tasks.history_tokens")
    return ids

  def answer_tokens(self, answer: str | None) -> list[int]:
    """Answer tokens (cut to `max_answer_tokens`) + end token; [] without an answer."""
    if answer is None:
      return []
    ids = self.tokenizer.encode(answer)[:self.cfg.max_answer_tokens]
    return ids + [prompts.end_token(self.tokenizer)]

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    task = element.get(TASK, self.cfg.tasks[0])
    if task not in self.cfg.tasks:
      raise ValueError(f"element has task {task!r}, not among the configured {self.cfg.tasks}")
    out = self.crop.map(element)
    prompt = self.prompt(element, task)
    answer_text = self.answer_text(element, task)
    answer = self.answer_tokens(answer_text)
    if task == prompts.NEXT_ITEM and not self.cfg.next_item_titles:
      answer = []  # the item head learns the target from `target_item`
    length = self.cfg.text_length
    tokens = np.full((length,), self.tokenizer.pad_id, np.int32)
    seq = prompt + answer
    tokens[:len(seq)] = seq
    positions = np.arange(length)
    out[TOKENS] = tokens
    out[TEXT_MASK] = positions < len(seq)
    out[LOSS_MASK] = (positions >= len(prompt)) & (positions < len(seq))
    out[PROMPT_LENGTH] = np.int32(len(prompt))
    out[ANSWER_LENGTH] = np.int32(len(answer))
    out[TASK_ID] = np.int32(prompts.TASKS.index(task))
    out[TARGET_ITEM] = np.int32(np.asarray(element[schema.ITEM_IDS]).reshape(-1)[-1])
    out[LABEL] = np.int32(element.get(schema.FAVORITE_CATEGORY, schema.PAD_ID))
    out[HAS_ANSWER] = np.bool_(answer_text is not None)
    return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch (leading axis)."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def prompt_of(example: dict[str, np.ndarray]) -> list[int]:
  """The prompt tokens of a (single) example."""
  return [int(t) for t in example[TOKENS][:int(example[PROMPT_LENGTH])]]


def answer_of(example: dict[str, np.ndarray]) -> list[int]:
  """The answer tokens of a (single) example, as trained: its loss-masked positions."""
  return [int(t) for t in example[TOKENS][np.asarray(example[LOSS_MASK], bool)]]
