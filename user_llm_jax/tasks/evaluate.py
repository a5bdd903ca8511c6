"""Task metrics of an LLM conditioned on a user (User-LLM or text prompt).

Procedures (each result dict carries its own `procedure` string):

* next item -- Recall@1/5/10 over K distinct catalogue titles. With at most
  `exact_threshold` distinct titles every title (+ end token) is scored exactly by teacher
  forcing, log p(title | prompt, user), and the K best distinct titles form the list.
  Above it, constrained beam search over the trie of catalogue titles with beam = K returns
  K distinct complete titles ranked by joint log-probability. A hit at k means the target's
  title is among the first k; an example whose target has no title (out of vocabulary)
  counts as a miss; nothing is counted twice (titles are distinct token sequences).
* favorite category -- the answer constrained to the label set: every category name (+ end
  token) is scored exactly and the best one is the prediction; accuracy over examples
  that have a label.
* review -- greedy decoding (at most `max_answer_tokens` + 1 tokens, stop at end of
  turn), ROUGE-Lsum F1 (`rouge-score`, stemming on) against the real review summary/text.

How the LLM reads the user is a `Conditioner`: `text_conditioner` (history in the prompt)
or `user_llm_conditioner` (cross-attention context or soft prompt from the encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from user_llm_jax.bridge import soft_prompt
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as transforms_lib
from user_llm_jax.eval import paired
from user_llm_jax.llm import beam_search as beam_lib
from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm.model import CrossContext, Decoder
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.llm.trie import TokenTrie
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts

DEFAULT_KS = (1, 5, 10)
ENCODER_KEYS = (transforms_lib.INPUTS_ITEM, transforms_lib.INPUTS_RATING,
                 transforms_lib.INPUTS_CATEGORY, transforms_lib.INPUTS_TIME,
                 transforms_lib.MASK, transforms_lib.LAST_INDEX)


@dataclasses.dataclass
class Conditioned:
  """What the decoder reads for a batch of B prompts.

  Exactly one of `prompts` (token lists, left-padded by the decoding functions) and
  `inputs_embeds` ([B, T, D] with `prompt_mask`) is set; `context`/`context_mask` are the
  cross-attention user embeddings or None.
  """

  decoder: Decoder
  prompts: list[list[int]] | None = None
  inputs_embeds: jax.Array | None = None
  prompt_mask: jax.Array | None = None
  context: jax.Array | CrossContext | None = None
  context_mask: jax.Array | None = None

  def row(self, i: int) -> "Conditioned":
    """The single-prompt slice i (batch axis kept, size 1)."""
    def take(x):
      if isinstance(x, CrossContext):
        return x.take(jnp.arange(i, i + 1))
      return None if x is None else x[i:i + 1]
    return Conditioned(self.decoder, None if self.prompts is None else [self.prompts[i]],
                       take(self.inputs_embeds), take(self.prompt_mask), take(self.context),
                       take(self.context_mask))


Conditioner = Callable[[dict[str, np.ndarray]], Conditioned]


def text_conditioner(decoder: Decoder) -> Conditioner:
  """The decoder reads the prompt tokens alone (text-prompt baseline, zero-shot LLM)."""
  def condition(batch):
    return Conditioned(decoder, prompts=[ex_lib.prompt_of({k: v[i] for k, v in batch.items()})
                                         for i in range(batch[ex_lib.TOKENS].shape[0])])
  return condition


@functools.partial(jax.jit, static_argnums=0)
def _user_context(graphdef, state, batch, target_rms=None):
  encoder, bridge = nnx.merge(graphdef, state)
  states = encoder(batch, deterministic=True)                      # [B,E,D_enc]
  return bridge(states, jnp.asarray(batch[transforms_lib.MASK], bool),
                target_rms=target_rms,
                categories=batch.get(transforms_lib.INPUTS_CATEGORY))  # [B,P,D], [B,P]


@functools.partial(jax.jit, static_argnums=0)
def _decoder_context(graphdef, state, batch, context, mask):
  return nnx.merge(graphdef, state).decoder_context(batch, context, mask), None


def user_llm_conditioner(model: nnx.Module, pad_id: int) -> Conditioner:
  """A `UserLLM` reads the user through its bridge (cross-attention or soft prompt)."""
  target_rms = model.bridge_target_rms()  # the soft prompt's scale (None: not normalised)

  def condition(batch):
    graphdef, state = nnx.split((model.encoder, model.bridge))
    context, mask = _user_context(graphdef, state, {k: batch[k] for k in ENCODER_KEYS},
                                  target_rms)
    token_lists = [ex_lib.prompt_of({k: v[i] for k, v in batch.items()})
                   for i in range(batch[ex_lib.TOKENS].shape[0])]
    if model.cfg.mode == "cross_attention":
      if model.llm.copy_head is not None:  # the copy head's memory travels with the context
        context, mask = _decoder_context(nnx.graphdef(model), nnx.state(model),
                                         {k: batch[k] for k in ENCODER_KEYS}, context, mask)
      return Conditioned(model.llm, prompts=token_lists, context=context, context_mask=mask)
    tokens, text_mask = sampler_lib.left_pad(token_lists, pad_id, 16)
    embeds, _, _ = soft_prompt.merge_soft_prompt(
        context, mask, model.llm.embed(jnp.asarray(tokens)), jnp.asarray(text_mask))
    return Conditioned(model.llm, inputs_embeds=embeds,
                       prompt_mask=jnp.concatenate([mask, jnp.asarray(text_mask)], axis=1))
  return condition


def score_options(cond: Conditioned, options: Sequence[Sequence[int]],
                  batch_size: int, *, independent_rows: bool = False,
                  min_length: int = 0) -> np.ndarray:
  """[B, C] exact log-probs of every option (token list) after each prompt.

  Args:
    independent_rows: prefill and score each prompt alone, so that a row's figures do not
      depend on the other rows of its batch (their padded length and count change the
      float rounding); answers to a users file then stay the same however it is batched.
    min_length: score at least this many positions per option (masked padding, the same
      figures): options of varying length then reuse one compiled shape.
  """
  if cond.prompts is not None and independent_rows:
    return np.concatenate([score_options(cond.row(i), options, batch_size,
                                         min_length=min_length)
                           for i in range(len(cond.prompts))])
  if cond.prompts is not None:
    # Token prompts (text prompt, cross-attention User-LLM): all rows prefilled at once.
    return beam_lib.score_candidates_batch(
        cond.decoder, cond.prompts, options, batch_size=batch_size, context=cond.context,
        context_mask=cond.context_mask, min_candidate_length=min_length)
  rows = []
  n = cond.inputs_embeds.shape[0]
  for i in range(n):
    one = cond.row(i)
    # Soft prompts, one row at a time: score_candidates takes all-real embeddings (it
    # left-pads them to its length bucket), so drop the padded slots of this row.
    keep = np.flatnonzero(np.asarray(one.prompt_mask[0]))
    rows.append(beam_lib.score_candidates(
        cond.decoder, None, options, batch_size=batch_size,
        inputs_embeds=one.inputs_embeds[:, keep], min_candidate_length=min_length))
  return np.stack(rows)


class Catalogue:
  """The distinct catalogue titles as token sequences, their trie, and item -> title index.

  With `max_tokens`, titles are cut to that many tokens exactly as the training answers
  are (`ExampleConfig.max_answer_tokens`), so the model is scored on what it was taught;
  titles that become identical share one entry (`num_merged` counts the extra items).
  """

  def __init__(self, vocab: schema.Vocabulary, tokenizer: Tokenizer,
               max_tokens: int | None = None):
    end = prompts.end_token(tokenizer)
    self.num_cut = 0
    index: dict[tuple[int, ...], int] = {}
    self.item_to_title = np.full((vocab.num_items,), -1, np.int64)
    self.sequences: list[list[int]] = []
    self.titles: list[str] = []
    for item in range(schema.FIRST_ID, vocab.num_items):
      title = vocab.items[item].title
      ids = tokenizer.encode(title)
      if max_tokens is not None and len(ids) > max_tokens:
        ids, self.num_cut = ids[:max_tokens], self.num_cut + 1
      seq = tuple(ids) + (end,)
      if seq not in index:
        index[seq] = len(self.sequences)
        self.sequences.append(list(seq))
        self.titles.append(title)
      self.item_to_title[item] = index[seq]
    self.num_merged = vocab.num_items - schema.FIRST_ID - len(self.sequences)
    self.trie = TokenTrie(self.sequences, tokenizer.vocab_size, end_token=end)
    self.end = end

  def __len__(self) -> int:
    return len(self.sequences)

  def title_index(self, item: int) -> int:
    return int(self.item_to_title[item]) if 0 <= item < len(self.item_to_title) else -1


def _batches(examples: Sequence[dict[str, np.ndarray]], batch_size: int, desc: str):
  for lo in tqdm.trange(0, len(examples), batch_size, desc=desc, leave=False):
    yield ex_lib.collate(examples[lo:lo + batch_size])


def next_item_ranking(cond: Conditioned, catalogue: Catalogue, k: int, *, exact: bool,
                      score_batch: int = 64, independent_rows: bool = False,
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The k best catalogue titles and their log-probabilities for each conditioned prompt.

  `independent_rows` as in `score_options` (exact scoring).

  Returns:
    ([B, k] title indices, best first, -1 where fewer than k complete titles were found;
    [B, k] their log-probabilities, -inf there).
  """
  if exact:
    scores = score_options(cond, catalogue.sequences, score_batch,
                           independent_rows=independent_rows)             # [B, C]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]            # ties: smaller index
    return order, np.take_along_axis(scores, order, axis=1)
  out = beam_lib.beam_search_model(
      cond.decoder, cond.prompts, beam_size=k, max_steps=catalogue.trie.max_depth,
      stop_tokens=(catalogue.end,), constraint=catalogue.trie.to_arrays(),
      inputs_embeds=cond.inputs_embeds, prompt_mask=cond.prompt_mask, context=cond.context,
      context_mask=cond.context_mask)
  lists = np.full(out.valid.shape, -1, np.int64)
  for b in range(lists.shape[0]):
    for j in range(lists.shape[1]):
      if out.valid[b, j]:
        items = catalogue.trie.items_of(out.tokens[b, j, :out.lengths[b, j]].tolist())
        lists[b, j] = items[0] if items else -1
  return lists, np.where(lists >= 0, np.asarray(out.scores), -np.inf)


def next_item_lists(cond: Conditioned, catalogue: Catalogue, k: int, *, exact: bool,
                    score_batch: int = 64) -> np.ndarray:
  """[B, k] title indices, best first (-1 where fewer than k complete titles were found)."""
  return next_item_ranking(cond, catalogue, k, exact=exact, score_batch=score_batch)[0]


def list_hits(lists: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
  """Per-example hits {k: float[B] of 0/1} of ranked lists [B, K] of title indices.

  A target of -1 (no title) is a miss; duplicated entries in a list are counted once.
  """
  hits = {k: np.zeros(len(targets), np.float64) for k in ks}
  for b, (row, target) in enumerate(zip(lists, targets)):
    if target < 0:
      continue
    seen, rank = set(), None
    for entry in row:
      if entry < 0 or entry in seen:
        continue
      if entry == target:
        rank = len(seen)
        break
      seen.add(entry)
    for k in ks:
      hits[k][b] = float(rank is not None and rank < k)
  return hits


def recall_from_lists(lists: np.ndarray, targets: np.ndarray,
                      ks: Sequence[int]) -> dict[str, float]:
  """Recall@k from ranked lists [B, K] of title indices and target title indices [B]
  (`list_hits`), with binomial standard errors."""
  hits = list_hits(lists, targets, ks)
  n = max(len(targets), 1)
  out = {f"recall@{k}": float(hits[k].sum()) / n for k in ks}
  out.update({f"recall@{k}_stderr": binomial_stderr(out[f"recall@{k}"], len(targets))
              for k in ks})
  return out


def binomial_stderr(p: float, n: int) -> float:
  """Standard error of a proportion `p` measured on `n` independent examples."""
  return float(np.sqrt(p * (1.0 - p) / n)) if n > 0 else float("nan")


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean) of per-example scores."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return 0.0, float("nan")
  se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")
  return float(values.mean()), se


def evaluate_next_item(condition: Conditioner, examples: Sequence[dict[str, np.ndarray]],
                       catalogue: Catalogue, *, ks: Sequence[int] = DEFAULT_KS,
                       exact_threshold: int = 1000, batch_size: int = 8,
                       desc: str = "eval next item",
                       ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Recall@k of next-item examples (see the module docstring for the procedure); with
  `ids` (one per example) the per-example hits are kept (`paired.PER_EXAMPLE`)."""
  ids = _check_ids(ids, examples)
  k = max(ks)
  exact = len(catalogue) <= exact_threshold
  lists, targets = [], []
  for batch in _batches(examples, batch_size, desc):
    lists.append(next_item_lists(condition(batch), catalogue, k, exact=exact))
    targets.extend(catalogue.title_index(int(t)) for t in batch[ex_lib.TARGET_ITEM])
  lists = np.concatenate(lists) if lists else np.zeros((0, k), np.int64)
  result: dict[str, Any] = recall_from_lists(lists, np.asarray(targets), ks)
  result["num_examples"] = len(targets)
  if ids is not None:
    hits = list_hits(lists, np.asarray(targets), ks)
    result[paired.PER_EXAMPLE] = paired.per_example(
        ids, {f"recall@{j}": hits[j] for j in ks})
  result["titles_cut"] = catalogue.num_cut
  result["items_sharing_a_title"] = catalogue.num_merged
  result["procedure"] = (
      f"exact scoring of all {len(catalogue)} distinct catalogue titles, top {k} distinct"
      if exact else
      f"constrained beam search over the trie of {len(catalogue)} catalogue titles, "
      f"beam = {k}, {k} distinct complete titles ranked by log-probability")
  return result


def _check_ids(ids: Sequence[int] | None, examples: Sequence[Any]) -> list[int] | None:
  if ids is None:
    return None
  ids = [int(i) for i in ids]
  if len(ids) != len(examples):
    raise ValueError(f"{len(ids)} example ids for {len(examples)} examples")
  return ids


def evaluate_category(condition: Conditioner, examples: Sequence[dict[str, np.ndarray]],
                      vocab: schema.Vocabulary, tokenizer: Tokenizer, *, batch_size: int = 8,
                      desc: str = "eval favorite category",
                      ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Favorite-category accuracy with answers constrained to the category names.

  Args:
    ids: one identifier per example (the test record index); with them the result keeps
      each scored example's correctness (`paired.PER_EXAMPLE`) for paired comparisons.
  """
  ids = _check_ids(ids, examples)
  end = prompts.end_token(tokenizer)
  names = list(vocab.categories[schema.FIRST_ID:])
  options = [tokenizer.encode(n) + [end] for n in names]
  hits: list[float] = []
  scored: list[int] = []                                 # positions of labelled examples
  for lo, batch in zip(range(0, len(examples), batch_size),
                       _batches(examples, batch_size, desc)):
    labels = np.asarray(batch[ex_lib.LABEL])
    valid = labels >= schema.FIRST_ID
    if not valid.any():
      continue
    batch = {k: v[valid] for k, v in batch.items()}
    scores = score_options(condition(batch), options, max(len(options), 1))  # [B, C]
    pred = np.argmax(scores, axis=1) + schema.FIRST_ID
    hits.extend((pred == labels[valid]).astype(np.float64).tolist())
    scored.extend((lo + np.flatnonzero(valid)).tolist())
  total = len(hits)
  accuracy = float(np.sum(hits)) / max(total, 1)
  out = {"accuracy": accuracy, "accuracy_stderr": binomial_stderr(accuracy, total),
         "num_examples": total,
         "procedure": f"exact scoring of the {len(names)} category names, argmax"}
  if ids is not None:
    out[paired.PER_EXAMPLE] = paired.per_example([ids[j] for j in scored],
                                                  {"accuracy": hits})
  return out


def rouge_lsum_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
  """Per-pair ROUGE-Lsum F1 (rouge-score, stemming)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
  return [scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(predictions, references)]


def rouge_lsum(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean ROUGE-Lsum F1 (rouge-score, stemming) of prediction/reference pairs."""
  if not references:
    return 0.0
  return mean_stderr(rouge_lsum_scores(predictions, references))[0]


def generate(cond: Conditioned, tokenizer: Tokenizer, max_new_tokens: int) -> list[str]:
  """Greedy answers (decoded text) for a conditioned batch."""
  return generate_with_tokens(cond, tokenizer, max_new_tokens)[0]


def generate_with_tokens(cond: Conditioned, tokenizer: Tokenizer, max_new_tokens: int,
                         ) -> tuple[list[str], list[list[int]]]:
  """Greedy answers for a conditioned batch: (decoded texts, generated token lists, the
  stop token included when the row emitted one)."""
  sampler = sampler_lib.Sampler(cond.decoder, pad_id=tokenizer.pad_id,
                                stop_tokens=tokenizer.stop_token_ids)
  out = sampler(cond.prompts, max_new_tokens=max_new_tokens, inputs_embeds=cond.inputs_embeds,
                prompt_mask=cond.prompt_mask, context=cond.context,
                context_mask=cond.context_mask)
  texts, token_lists = [], []
  for i in range(out.tokens.shape[0]):
    n = int(out.lengths[i])
    texts.append(tokenizer.decode(out.tokens[i, :n]).strip())
    token_lists.append([int(t) for t in out.tokens[i, :n + int(bool(out.stopped[i]))]])
  return texts, token_lists


def answer_log_probs(cond: Conditioned, answers: Sequence[Sequence[int]],
                     generated: Sequence[Sequence[int]], *, min_length: int = 0,
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Row i's exact log-probabilities of its own `answers[i]` and `generated[i]`: ([B], [B]).

  Each row is prefilled alone and scores its two sequences (the batched scorer would score
  every row's options after every prompt: B times the cache for a long text prompt).
  `min_length` as in `score_options` (the longest answer allowed keeps one shape).
  """
  n = len(answers)
  if len(generated) != n:
    raise ValueError(f"{len(generated)} generated answers for {n} reference answers")
  scores = np.stack([score_options(cond.row(i), [list(answers[i]), list(generated[i])], 2,
                                   min_length=min_length)[0]
                     for i in range(n)])                                    # [B, 2]
  return scores[:, 0], scores[:, 1]


def evaluate_review(condition: Conditioner, examples: Sequence[dict[str, np.ndarray]],
                    references: Sequence[str], tokenizer: Tokenizer, *, max_new_tokens: int,
                    batch_size: int = 8, desc: str = "eval review",
                    ids: Sequence[int] | None = None, likelihood: bool = False,
                    ) -> dict[str, Any]:
  """ROUGE-Lsum of greedy review generations against `references` (one per example);
  with `ids` (one per example) the per-example scores are kept (`paired.PER_EXAMPLE`).

  With `likelihood`, each example's reference answer (its trained answer tokens) and its
  greedy answer are also scored exactly under the same conditioning. That separates a
  model that does not know the answer from a search that misses it: `search_errors` is
  the share of examples whose greedy answer differs from the reference although the model
  gives the reference the higher log-probability (a better decoder would find it), and
  `reference_logprob` (nats per answer, kept per example) compared between the real and
  the shuffled context says how much the context raises the right answer even where
  greedy decoding does not write it. Its time is reported apart (`likelihood_sec`).
  """
  if len(references) != len(examples):
    raise ValueError(f"{len(references)} references for {len(examples)} examples")
  ids = _check_ids(ids, examples)
  predictions: list[str] = []
  ref_lp: list[float] = []
  search_error: list[float] = []
  likelihood_sec = 0.0
  for lo, batch in zip(range(0, len(examples), batch_size),
                       _batches(examples, batch_size, desc)):
    cond = condition(batch)
    texts, generated = generate_with_tokens(cond, tokenizer, max_new_tokens)
    predictions.extend(texts)
    if likelihood:
      start = time.perf_counter()
      answers = [ex_lib.answer_of(ex) for ex in examples[lo:lo + batch_size]]
      ref, gen = answer_log_probs(cond, answers, generated, min_length=max_new_tokens)
      ref_lp.extend(float(x) for x in ref)
      search_error.extend(float(a != g and r > q)
                          for a, g, r, q in zip(answers, generated, ref, gen))
      likelihood_sec += time.perf_counter() - start
  scores = rouge_lsum_scores(predictions, references)
  mean, se = mean_stderr(scores)
  values = {"rougeLsum": scores}
  out: dict[str, Any] = {"rougeLsum": mean, "rougeLsum_stderr": se,
                         "num_examples": len(references)}
  procedure = (f"greedy decoding (<= {max_new_tokens} tokens), ROUGE-Lsum F1 "
               "(rouge-score, stemmed) against the real review")
  if likelihood:
    values.update(reference_logprob=ref_lp, search_errors=search_error)
    for key, vals in (("reference_logprob", ref_lp), ("search_errors", search_error)):
      out[key], out[key + "_stderr"] = mean_stderr(vals)
    out["likelihood_sec"] = likelihood_sec
    procedure += ("; reference_logprob: exact log-probability of the reference answer "
                  "tokens (nats); search_errors: share where the model scores the reference "
                  "above its own greedy answer")
  if ids is not None:
    out[paired.PER_EXAMPLE] = paired.per_example(ids, values)
  return {**out, "procedure": procedure,
          "samples": [{"prediction": p, "reference": r}
                      for p, r in zip(predictions[:3], references[:3])]}
