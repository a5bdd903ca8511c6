"""Answering for users with a trained User-LLM: load it from its workdir, answer in batches.

Everything comes from the User-LLM workdir (for the main pipeline: its `user_llm` stage):
the architecture and config (`run.json`), the weights (its checkpoint), the tokenizer and
the catalogue vocabulary. Neither the encoder pretraining run nor the LLM's original
weights are read. Users' history files are read by `histories` (formats and checks there).

For each user an `Answerer` gives

  * the top-K catalogue items with scores: from the item head on the next-item prompt
    (`UserLLM.next_item_logits`) when the model has one, else by the run's evaluation
    procedure over catalogue titles (`tasks.evaluate.next_item_ranking`: exact scoring of
    every title for catalogues up to `eval.exact_threshold` titles, constrained beam search
    above);
  * greedy answers to the configured tasks' prompts, or to a free question.

Batches keep the user on the leading axis and run through the same jitted functions as
the evaluation (`user_llm_conditioner`, the sampler, beam search, `next_item_logits`), so
a user's answers do not depend on who else is in the batch.

How the LLM reads the user is a `Reader`: the User-LLM's (`user_llm_reader`, the default)
or the text-prompt baseline's (`text_prompt.reader`: the history as text in every prompt),
so both answer the same users through one `Answerer`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from user_llm_jax import histories
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.data import schema
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import checkpointing

USER_LLM_JOBS = ("train_user_llm",)
USER_LLM = "user_llm"
TEXT_PROMPT = "text_prompt"
MAKE_HINT = ("python -m experiments.main --config=experiments/configs/main.py --workdir=DIR "
             "(or a user_llm_*.py config)")
RANKINGS = ("auto", "item_head", "titles")
_SCORE_DECIMALS = 6


def history_record(path: str, vocab: schema.Vocabulary) -> dict[str, Any]:
  """The first user's schema record of a history file, with `unknown_items` ('line:id').

  Raises:
    BadInputError: see `histories.read_histories`.
  """
  history, _ = histories.read_history(path, vocab)
  return dict(history.record, unknown_items=list(history.unknown_ids))


def run_dir(workdir: str) -> str:
  """The User-LLM run of `workdir`: itself, or the main pipeline's `user_llm` stage."""
  stage = os.path.join(workdir, "user_llm")
  if not os.path.exists(os.path.join(workdir, runs.RUN_JSON)) and os.path.isdir(stage):
    return stage
  return workdir


def trained_run(workdir: str) -> runs.Run:
  """The trained User-LLM run of `workdir` (nothing built yet).

  Raises:
    NotARunError: the workdir holds no trained User-LLM (the message says what to run).
  """
  return runs.load_run(run_dir(workdir), job=USER_LLM_JOBS, what="trained User-LLM",
                       make=MAKE_HINT)


def load_model(run: runs.Run) -> nnx.Module:
  """The run's User-LLM with the weights of its latest checkpoint."""
  model = models.user_llm_from_architecture(run.architecture, seed=0)
  checkpointing.restore_params(model, run.checkpoints)
  return model


def load_trained(workdir: str):
  """(model, tokenizer, vocabulary, run) of the trained User-LLM in `workdir`.

  Raises:
    NotARunError: the workdir holds no trained User-LLM (the message says what to run).
  """
  run = trained_run(workdir)
  return load_model(run), run.tokenizer(), run.vocabulary(), run


def _padded(rows: list[dict[str, np.ndarray]], size: int | None) -> list[dict[str, np.ndarray]]:
  """`rows` repeated at the end up to `size` (constant shapes: one compile per batch size)."""
  if size is None or len(rows) >= size:
    return rows
  return rows + [rows[-1]] * (size - len(rows))


def answers(model: nnx.Module, tokenizer: Tokenizer, examples: Sequence[dict[str, np.ndarray]],
            prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int, *,
            pad_to: int | None = None) -> list[str]:
  """Greedy answers of the User-LLM, one per (user example, prompt), in one batch.

  Args:
    model: the User-LLM.
    tokenizer: its tokenizer.
    examples: each user's encoder inputs (a task example or `CropAndPad` output).
    prompt_tokens: each user's prompt.
    max_new_tokens: the longest answer.
    pad_to: pad the batch to this many rows (repeating the last; results dropped).
  """
  length = max(len(p) for p in prompt_tokens)
  rows = []
  for example, prompt in zip(examples, prompt_tokens, strict=True):
    row = {k: np.asarray(example[k]) for k in eval_lib.ENCODER_KEYS}
    tokens = np.full((length,), tokenizer.pad_id, np.int32)
    tokens[:len(prompt)] = prompt
    row[ex_lib.TOKENS] = tokens
    row[ex_lib.PROMPT_LENGTH] = np.int32(len(prompt))
    rows.append(row)
  cond = eval_lib.user_llm_conditioner(model, tokenizer.pad_id)(
      ex_lib.collate(_padded(rows, pad_to)))
  return eval_lib.generate(cond, tokenizer, max_new_tokens)[:len(rows)]


def answer(model: nnx.Module, tokenizer: Tokenizer, example: dict[str, np.ndarray],
           prompt: list[int], max_new_tokens: int) -> str:
  """Greedy answer of the User-LLM to `prompt` for the user of `example`."""
  return answers(model, tokenizer, [example], [prompt], max_new_tokens)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _item_head_top(graphdef, state, batch, k):
  scores = nnx.merge(graphdef, state).next_item_logits(batch)   # [B, V], PAD/OOV -inf
  return jax.lax.top_k(scores, k)                                # [B, k] scores, ids


def ranking_method(model: nnx.Module, ranking: str = "auto") -> str:
  """'item_head' or 'titles': how the top-K items are found.

  `auto` uses the item head when the model has one, else the catalogue titles.
  """
  return _ranking_method(getattr(model, "item_head", None) is not None, ranking)


def _ranking_method(has_head: bool, ranking: str) -> str:
  if ranking not in RANKINGS:
    raise ValueError(f"ranking={ranking!r}: expected one of {RANKINGS}")
  if ranking == "item_head" and not has_head:
    raise ValueError("ranking='item_head' but this User-LLM has no item head "
                     "(bridge.item_head=False)")
  return "item_head" if ranking == "item_head" or (ranking == "auto" and has_head) \
      else "titles"


@dataclasses.dataclass(frozen=True)
class Reader:
  """How an answering LLM reads its users, and what it answers.

  Attributes:
    name: `USER_LLM` (the encoder's embeddings through the bridge) or `TEXT_PROMPT` (the
      history rendered as text in every prompt).
    example_config: its task examples (prompt shapes and history text, answer length,
      tasks).
    condition: a batch of task examples -> what its decoder reads (`tasks.evaluate`).
    item_head: the model has a full-catalogue item head (`UserLLM.next_item_logits`).
    ranks_items: the top-K catalogue items are part of its answers.
    decoded_tasks: the tasks answered by greedy decoding (review only where a record has
      a target event: `Answerer.answered_tasks`).
  """

  name: str
  example_config: ex_lib.ExampleConfig
  condition: eval_lib.Conditioner
  item_head: bool
  ranks_items: bool
  decoded_tasks: tuple[str, ...]


def user_llm_reader(model: nnx.Module, tokenizer: Tokenizer,
                    config: ml_collections.ConfigDict, vocab: schema.Vocabulary) -> Reader:
  """The User-LLM's reader: top-K items always; the next item's title decoded only when
  the run taught the model to write titles (`tasks.next_item_titles`)."""
  cfg = runner.example_config(config, vocab=vocab)
  return Reader(
      name=USER_LLM, example_config=cfg,
      condition=eval_lib.user_llm_conditioner(model, tokenizer.pad_id),
      item_head=getattr(model, "item_head", None) is not None, ranks_items=True,
      decoded_tasks=tuple(t for t in cfg.tasks
                          if t != prompts.NEXT_ITEM or cfg.next_item_titles))


class Answerer:
  """Top-K items and greedy task answers for batches of users of one trained model.

  Args:
    model: the trained User-LLM (or, with a text-prompt `reader`, the decoder).
    tokenizer: its tokenizer.
    vocab: its catalogue.
    config: the run's config (`tasks`, `data`, `eval.exact_threshold`).
    top_k: items ranked per user.
    ranking: 'auto', 'item_head' or 'titles' (see `ranking_method`); `method` is then
      'item_head', 'exact' or 'beam'.
    pad_to: pad every batch to this many users (None: no padding).
    reader: how the model reads its users (default: `user_llm_reader`).
  """

  def __init__(self, model: nnx.Module, tokenizer: Tokenizer, vocab: schema.Vocabulary,
               config: ml_collections.ConfigDict, *, top_k: int = 10, ranking: str = "auto",
               pad_to: int | None = None, reader: Reader | None = None):
    if top_k < 1:
      raise ValueError(f"--top_k must be >= 1, got {top_k}")
    self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
    self.top_k, self.pad_to = int(top_k), pad_to
    self.reader = reader or user_llm_reader(model, tokenizer, config, vocab)
    cfg = self.reader.example_config
    self.tasks = tuple(cfg.tasks)
    self.next_item_titles = cfg.next_item_titles
    self.max_answer_tokens = cfg.max_answer_tokens
    # Every task's prompt can be built, whichever tasks the run trained.
    self.transform = ex_lib.TaskExample(vocab, tokenizer,
                                        dataclasses.replace(cfg, tasks=prompts.TASKS))
    self.condition = self.reader.condition
    # Real (unpadded) prompt tokens and prompts answered so far, per task: what a user
    # costs to read (the text prompt's grow with the history).
    self.prompt_tokens: dict[str, int] = {}
    self.prompts: dict[str, int] = {}
    self.catalogue = None
    self.method = _ranking_method(self.reader.item_head, ranking)
    if self.method == "titles":
      # As the evaluation: exact scoring of every title up to `eval.exact_threshold`
      # distinct titles, constrained beam search above.
      self.catalogue = eval_lib.Catalogue(vocab, tokenizer, max_tokens=cfg.max_answer_tokens)
      self.method = ("exact" if len(self.catalogue) <= int(config.eval.exact_threshold)
                     else "beam")
      self.title_items: list[list[int]] = [[] for _ in range(len(self.catalogue))]
      for item in range(schema.FIRST_ID, vocab.num_items):
        self.title_items[self.catalogue.title_index(item)].append(item)
    else:
      self._graphdef, self._state = nnx.split(model)

  @property
  def procedure(self) -> str:
    """How the top-K items and their scores are found."""
    if self.method == "item_head":
      return (f"item head scores (logits) of all {self.vocab.num_items - schema.FIRST_ID} "
              "catalogue items at the next-item prompt's last token")
    if self.method == "exact":
      return (f"exact log-probability of each of the {len(self.catalogue)} distinct "
              "catalogue titles after the next-item prompt")
    return (f"constrained beam search (beam = {self.top_k}) over the trie of the "
            f"{len(self.catalogue)} catalogue titles, log-probabilities")

  def answered_tasks(self, with_targets: bool) -> tuple[str, ...]:
    """The configured tasks whose answers are decoded (`Reader.decoded_tasks`).

    Review only for records with a target event (its prompt names the item to review).
    """
    return tuple(t for t in self.reader.decoded_tasks
                 if t != prompts.REVIEW or with_targets)

  def example(self, record: dict[str, Any], task: str) -> dict[str, np.ndarray]:
    return self.transform.map(dict(record, **{ex_lib.TASK: task}))

  def _examples(self, records: Sequence[dict[str, Any]],
                task: str) -> list[dict[str, np.ndarray]]:
    """The task examples of `records`, counted in `prompt_tokens` / `prompts`."""
    examples = [self.example(r, task) for r in records]
    self.prompt_tokens[task] = self.prompt_tokens.get(task, 0) + sum(
        int(e[ex_lib.PROMPT_LENGTH]) for e in examples)
    self.prompts[task] = self.prompts.get(task, 0) + len(examples)
    return examples

  def mean_prompt_tokens(self) -> dict[str, float]:
    """Mean real prompt length of each task answered so far."""
    return {t: self.prompt_tokens[t] / n for t, n in self.prompts.items() if n}

  def _item(self, item: int, score: float) -> dict[str, Any]:
    info = self.vocab.items[item]
    return {"item_id": info.raw_id, "title": info.title,
            "score": round(float(score), _SCORE_DECIMALS)}

  def top_items(self, records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each user's top-K catalogue items, best first: {item_id, title, score}.

    Ranked by titles, items sharing a title form one entry (their ids in `item_ids`).
    """
    examples = self._examples(records, prompts.NEXT_ITEM)
    # Exact scoring goes one user at a time: padding rows would only be scored in vain.
    batch = ex_lib.collate(_padded(examples, None if self.method == "exact" else self.pad_to))
    out: list[list[dict[str, Any]]] = []
    if self.method == "item_head":
      keys = eval_lib.ENCODER_KEYS + (ex_lib.TOKENS, ex_lib.TEXT_MASK, ex_lib.PROMPT_LENGTH)
      k = min(self.top_k, self.vocab.num_items - schema.FIRST_ID)
      scores, ids = jax.device_get(_item_head_top(
          self._graphdef, self._state, {key: batch[key] for key in keys}, k))
      for row in range(len(records)):
        out.append([self._item(int(i), s) for i, s in zip(ids[row], scores[row])
                    if np.isfinite(s)])
      return out
    # A user's answer must not depend on the users batched with it (a resumed file is
    # byte-identical to an uninterrupted one), so exact scoring prefills each row alone.
    lists, scores = eval_lib.next_item_ranking(self.condition(batch), self.catalogue,
                                               self.top_k, exact=self.method == "exact",
                                               independent_rows=True)
    for row in range(len(records)):
      entries = []
      for title, score in zip(lists[row], scores[row]):
        if title < 0:
          continue
        items = self.title_items[int(title)]
        entry = self._item(items[0], score)
        if len(items) > 1:
          entry["item_ids"] = [self.vocab.items[i].raw_id for i in items]
        entries.append(entry)
      out.append(entries)
    return out

  def task_answers(self, records: Sequence[dict[str, Any]],
                   tasks: Sequence[str]) -> list[dict[str, str]]:
    """Each user's greedy answer to each task's fixed prompt: [{task: text}]."""
    out: list[dict[str, str]] = [{} for _ in records]
    for task in tasks:
      examples = self._examples(records, task)
      cond = self.condition(ex_lib.collate(_padded(examples, self.pad_to)))
      # As the evaluation decodes reviews: at most the answer length + the end token.
      texts = eval_lib.generate(cond, self.tokenizer, self.max_answer_tokens + 1)
      for row, text in zip(out, texts[:len(records)]):
        row[task] = text
    return out

  def ask(self, records: Sequence[dict[str, Any]], prompt: list[int],
          max_new_tokens: int) -> list[str]:
    """Each user's greedy answer to the same free prompt (a User-LLM's: the prompt
    carries no history text)."""
    if self.reader.name != USER_LLM:
      raise ValueError(f"a free question is answered by a User-LLM, not by a "
                       f"{self.reader.name!r} reader (its prompts hold the history text)")
    crops = [self.transform.crop.map(r) for r in records]
    return answers(self.model, self.tokenizer, crops, [prompt] * len(crops), max_new_tokens,
                   pad_to=self.pad_to)

  def references(self, record: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The true answers of a record with a target event (a prepared split's record)."""
    return {t: self.transform.answer_text(record, t) for t in tasks}
