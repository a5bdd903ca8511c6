"""The alignment stage's examples: the LLM writes out the user's recent events.

Before the tasks, with the LLM frozen, the bridge (projection / Perceiver / cross-attention,
`align.trainable`) learns to make the user embeddings readable by the LLM, as LLaVA's stage 1
teaches a projector to caption images. The supervision is free and present in every window:
the titles of the last `events` events the encoder reads, oldest first,

  prompt   "Write out the last 5 movies of this user's history, oldest first."
  answer   "Recent: Heat (1995); Up (2009); Alien (1979); Big (1988); Jaws (1975)"

or, with `content='categories'`, the words of those events' categories (a genre, a product
category, a summary the user keeps writing: `data.text_categories`), which is what
`bridge.category_text` puts into each event's user embedding:

  prompt   "Write out the categories of the last 3 products of this user's history, ..."
  answer   "Recent: five stars, Gift Cards; Gift Cards; great gift, Gift Cards"

The titles teach the bridge to name items; the categories teach the cross-attention blocks
to copy the words the user context carries, in order (the review task's answer is often
such a summary, which User-LLM otherwise rarely learns to write out in a few hundred task
steps: README, Amazon).

An example has the same keys and meaning as a task example (`tasks.examples`: tokens,
loss_mask, text_mask, prompt_length, ... and the encoder's features), so `UserLLM.loss`
trains on it unchanged. Its `task_id` is `ALIGN_TASK_ID`, outside `prompts.TASKS`: the
per-task losses and the item head's loss ignore it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import schema
from user_llm_jax.data import text_categories
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts

ALIGN_TASK_ID = len(prompts.TASKS)
ANSWER_PREFIX = "Recent: "
# The bridge modules an alignment stage may train (`strategies.module_filter` names).
MODULES = ("projection", "perceiver", "cross_attention", "encoder")
# What the answer writes out about each recent event.
CONTENTS = ("titles", "categories")
CATEGORY_SEPARATOR = ", "


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """The `align.*` section of a User-LLM config.

  Attributes:
    steps: optimizer steps of the alignment stage (0: no alignment stage).
    events: how many of the most recent history events the answer names.
    content: what it writes of each: 'titles' (the item's title) or 'categories' (the
      words of the event's category names, `text_categories.category_words`).
    trainable: the modules that train (of `MODULES`); everything else, the LLM above all,
      stays bit-identical. A name the model lacks (e.g. 'perceiver' without one) selects
      nothing.
    learning_rate: peak learning rate (warmup then cosine decay over `steps`; the
      `train.*` optimizer keys weight_decay, grad_clip and lr_mults apply too).
    warmup: linear warmup steps.
    max_answer_tokens: the answer is cut to this many tokens (then the end token).
  """

  steps: int = 0
  events: int = 3
  content: str = "titles"
  trainable: tuple[str, ...] = ("projection", "perceiver", "cross_attention")
  learning_rate: float = 1e-3
  warmup: int = 10
  max_answer_tokens: int = 48

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"align.steps must be >= 0, got {self.steps}")
    for name in ("events", "max_answer_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"align.{name} must be >= 1, got {getattr(self, name)}")
    if self.warmup < 0:
      raise ValueError(f"align.warmup must be >= 0, got {self.warmup}")
    if not self.learning_rate > 0:
      raise ValueError(f"align.learning_rate must be positive, got {self.learning_rate}")
    if self.content not in CONTENTS:
      raise ValueError(f"align.content={self.content!r}: must be one of {CONTENTS}")
    unknown = [m for m in self.trainable if m not in MODULES]
    if unknown or not self.trainable:
      raise ValueError(f"align.trainable {tuple(self.trainable)}: unknown {unknown}; choose "
                       f"from {MODULES}")

  @property
  def enabled(self) -> bool:
    return self.steps > 0


def question(spec: prompts.PromptSpec, events: int, content: str = "titles") -> str:
  """The fixed alignment question (the user turn)."""
  item, _ = spec.nouns
  what = "the categories of " if content == "categories" else ""
  return f"Write out {what}the last {events} {item}s of this user's history, oldest first."


def answer_text(titles: Sequence[str]) -> str:
  """'Recent: <title>; <title>; ...' (oldest first)."""
  return ANSWER_PREFIX + prompts.HISTORY_SEPARATOR.join(titles)


def recent_titles(features: Mapping[str, np.ndarray], vocab: schema.Vocabulary,
                  events: int) -> list[str]:
  """Titles of the last `events` events the encoder reads (`CropAndPad` output), oldest first.

  Events whose item has no title (out-of-vocabulary ids) are left out, so an answer can
  name fewer than `events` titles.
  """
  items = np.asarray(features[transforms_lib.INPUTS_ITEM]).reshape(-1)
  n = int(np.asarray(features[transforms_lib.MASK]).sum())
  return [vocab.items[int(i)].title for i in items[max(n - events, 0):n]
          if schema.FIRST_ID <= int(i) < vocab.num_items]


def recent_categories(features: Mapping[str, np.ndarray], vocab: schema.Vocabulary,
                      events: int) -> list[str]:
  """The category words of the last `events` events the encoder reads, oldest first: each
  event's names joined by `CATEGORY_SEPARATOR` in their slot order.

  Reserved and out-of-vocabulary category ids are skipped; an event without a real
  category is left out, so an answer can name fewer than `events` events.
  """
  cats = np.asarray(features[transforms_lib.INPUTS_CATEGORY])  # [window, C]
  n = int(np.asarray(features[transforms_lib.MASK]).sum())
  out = []
  for row in cats[max(n - events, 0):n]:
    words = [text_categories.category_words(vocab.categories[int(c)])
             for c in row if schema.FIRST_ID <= int(c) < vocab.num_categories]
    if words:
      out.append(CATEGORY_SEPARATOR.join(words))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class AlignExample(grain.transforms.Map):
  """A timeline record -> a fixed-shape alignment example (see the module docstring).

  Attributes:
    vocab: the prepared dataset's vocabulary.
    tokenizer: the LLM's tokenizer.
    cfg: the task examples' shapes (window, categories, prompt budget, dataset wording).
    align: the alignment stage's config (events, answer length).
  """

  vocab: schema.Vocabulary
  tokenizer: Tokenizer
  cfg: ex_lib.ExampleConfig
  align: AlignConfig

  @property
  def text_length(self) -> int:
    return self.cfg.max_prompt_tokens + self.align.max_answer_tokens + 1

  def prompt(self) -> list[int]:
    ids = prompts.chat_prompt(self.tokenizer, question(self.cfg.spec, self.align.events,
                                                       self.align.content))
    if len(ids) > self.cfg.max_prompt_tokens:
      raise ValueError(f"the alignment prompt has {len(ids)} tokens but "
                       f"tasks.max_prompt_tokens is {self.cfg.max_prompt_tokens}; raise it")
    return ids

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    out = transforms_lib.CropAndPad(self.cfg.window, self.cfg.max_categories).map(element)
    recent = recent_categories if self.align.content == "categories" else recent_titles
    entries = recent(out, self.vocab, self.align.events)
    prompt = self.prompt()
    answer = []
    if entries:
      answer = self.tokenizer.encode(answer_text(entries))[:self.align.max_answer_tokens]
      answer.append(prompts.end_token(self.tokenizer))
    seq = prompt + answer
    length = self.text_length
    tokens = np.full((length,), self.tokenizer.pad_id, np.int32)
    tokens[:len(seq)] = seq
    positions = np.arange(length)
    out[ex_lib.TOKENS] = tokens
    out[ex_lib.TEXT_MASK] = positions < len(seq)
    out[ex_lib.LOSS_MASK] = (positions >= len(prompt)) & (positions < len(seq))
    out[ex_lib.PROMPT_LENGTH] = np.int32(len(prompt))
    out[ex_lib.ANSWER_LENGTH] = np.int32(len(answer))
    out[ex_lib.TASK_ID] = np.int32(ALIGN_TASK_ID)
    out[ex_lib.TARGET_ITEM] = np.int32(np.asarray(element[schema.ITEM_IDS]).reshape(-1)[-1])
    out[ex_lib.LABEL] = np.int32(element.get(schema.FAVORITE_CATEGORY, schema.PAD_ID))
    out[ex_lib.HAS_ANSWER] = np.bool_(bool(entries))
    return out


def train_iterator(records: Sequence[Any], transform: AlignExample, *, batch_size: int,
                   seed: int, worker_count: int = 0):
  """Endless shuffled alignment examples of `records` (`batch_size` is global)."""
  return iter(pipeline_lib.make_pipeline(
      records, batch_size=batch_size // jax.process_count(), seed=seed, shuffle=True,
      num_epochs=None, transforms=[transform], worker_count=worker_count))
