"""Fixed task prompts and the text-prompt baseline's rendering of a user's history.

User-LLM poses every task with a short fixed prompt (about 32 SmolLM2 tokens in ChatML): the
user's history reaches the LLM only through the user embeddings, so the prompt length does
not grow with the history. The text-prompt baseline asks the same question but prepends the
history rendered as text,

  "Toy Story (1995), rated 4.0, Adventure|Animation; Heat (1995), rated 3.5, Action; ..."

keeping the most recent events that fit a token budget (oldest events are dropped first).

Tasks (the answer the LLM learns to produce, terminated by the end-of-turn token):

  next_item          the target item's title
  favorite_category  the name of the most frequent category of the history
  review             the target event's review summary (or text), with the item's name and
                     the rating in the prompt
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from user_llm_jax.llm.tokenizer import Tokenizer

NEXT_ITEM = "next_item"
FAVORITE_CATEGORY = "favorite_category"
REVIEW = "review"
TASKS = (NEXT_ITEM, FAVORITE_CATEGORY, REVIEW)

# Words that make the fixed prompts read naturally for each dataset family.
_DOMAIN = {
    "movielens": ("movie", "genre"),
    "synthetic": ("movie", "genre"),
    "amazon": ("product", "category"),
    "google_local": ("place", "category"),
}

SYSTEM = "You predict what a user does next."
HISTORY_SEPARATOR = "; "


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How prompts are phrased for one dataset.

  Attributes:
    dataset: dataset family ('movielens', 'amazon', 'google_local', 'synthetic').
    max_item_tokens: the item name in a review prompt is cut to this many tokens, so the
      prompt stays short whatever the name's length.
  """

  dataset: str = "movielens"
  max_item_tokens: int = 12

  @property
  def nouns(self) -> tuple[str, str]:
    """(item noun, category noun) of the dataset, e.g. ('movie', 'genre')."""
    return _DOMAIN.get(self.dataset, ("item", "category"))


def question(spec: PromptSpec, task: str, *, item_name: str = "", rating: float = 0.0) -> str:
  """The fixed question of `task` (the user turn, without any history).

  Raises:
    ValueError: for an unknown task.
  """
  item, category = spec.nouns
  if task == NEXT_ITEM:
    return f"Which {item} will this user rate next? Answer with its exact title."
  if task == FAVORITE_CATEGORY:
    return f"Which {category} appears most often in this user's history? Answer with its name."
  if task == REVIEW:
    return f"Write the user's review title for the {item} \"{item_name}\" rated {rating:g}/5."
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def shorten(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
  """`text` cut to its first `max_tokens` tokens (decoded back to a string)."""
  ids = tokenizer.encode(text)
  return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def chat_prompt(tokenizer: Tokenizer, user_text: str) -> list[int]:
  """ChatML prompt tokens ending with the assistant header (the answer follows)."""
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text}]
  return tokenizer.encode_chat(messages, add_generation_prompt=True)


def prompt_tokens(tokenizer: Tokenizer, spec: PromptSpec, task: str, *,
                  history_text: str | None = None, item_name: str = "",
                  rating: float = 0.0) -> list[int]:
  """Tokens of the whole prompt of one example.

  Args:
    tokenizer: the LLM's tokenizer (ChatML).
    spec: dataset phrasing.
    task: one of `TASKS`.
    history_text: the rendered history (text-prompt baseline); None for User-LLM.
    item_name: the target item's name (review task).
    rating: the target rating (review task).

  Returns:
    Token ids of `[system turn][user turn][assistant header]`.
  """
  if task == REVIEW:
    item_name = shorten(tokenizer, item_name, spec.max_item_tokens)
  text = question(spec, task, item_name=item_name, rating=rating)
  if history_text is not None:
    text = f"History: {history_text}\n{text}"
  return chat_prompt(tokenizer, text)


def render_event(title: str, rating: float | None, categories: Sequence[str]) -> str:
  """One event as text: 'Toy Story (1995), rated 4.0, Adventure|Animation'."""
  parts = [title]
  if rating is not None:
    parts.append(f"rated {rating:.1f}")
  if categories:
    parts.append("|".join(categories))
  return ", ".join(parts)


def render_history(events: Sequence[str], tokenizer: Tokenizer, budget: int) -> tuple[str, int]:
  """Joins the most recent events whose rendering fits in `budget` tokens.

  Events are given oldest first and stay in chronological order in the text; the oldest
  ones are dropped until the joined text (as the tokenizer encodes it) fits.

  Args:
    events: rendered events, oldest first.
    tokenizer: the LLM's tokenizer.
    budget: maximum number of history tokens (>= 0).

  Returns:
    (text, number of events kept).
  """
  if budget < 0:
    raise ValueError(f"history token budget must be >= 0, got {budget}")
  sep = len(tokenizer.encode(HISTORY_SEPARATOR))
  # Estimate with per-event counts (newest first), then check the joined encoding, which
  # can differ by a token at the joins.
  kept, total = 0, 0
  for event in reversed(events):
    cost = len(tokenizer.encode(event)) + (sep if kept else 0)
    if total + cost > budget:
      break
    total += cost
    kept += 1
  while kept:
    text = HISTORY_SEPARATOR.join(events[len(events) - kept:])
    if len(tokenizer.encode(text)) <= budget:
      return text, kept
    kept -= 1
  return "", 0


def byte_level_tokenizer() -> Tokenizer:
  """A byte-level tokenizer without merges (256 bytes + 3 ChatML/control tokens).

  For randomly initialised tiny LLMs (tests, the `:smoke` configs): every string encodes
  to its UTF-8 bytes, so it needs no vocabulary file; `vocab_size` is 259.
  """
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  eos, end = tok.token_to_id(specials[0]), tok.token_to_id(specials[2])
  return Tokenizer(tok, bos_id=None, eos_id=eos, pad_id=eos, stop_token_ids=[end, eos])


def end_token(tokenizer: Tokenizer) -> int:
  """The token that ends an answer (ChatML `<|im_end|>`, else end-of-text)."""
  return int(tokenizer.stop_token_ids[0])
