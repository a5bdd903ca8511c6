"""Non-LLM baselines of the task jobs, on the same seeded test records as the LLM rows.

  sasrec        next item: the pretrained encoder's own next-item head, full-catalogue
                ranking (the SASRec-style baseline)
  popularity    next item: training-split item counts, full-catalogue ranking
  majority      favorite category: always the commonest training label (the floor a
                personalized answer must beat)
  rating_prior  review: the commonest training answer for the review's rating, which the
                prompt states (the score a model reaches from the rating alone)
  count_window  favorite category: the label's own rule (the most frequent category)
                applied to the events the encoder reads (the last `data.window`); what an
                exact reader of User-LLM's user context answers. Not a floor but a reference
                from above: the label counts the whole history, so where the history is
                longer than the window even this count can miss. The text-prompt job adds
                `count_prompt`, the same count over the events its prompt shows.
  probe         favorite category: a linear probe of the pretrained encoder's states,
                mean-pooled (`eval/probe.py`): whether the states User-LLM reads still
                carry the label, i.e. whether a miss is the encoder's or the bridge's
  past_answer   review: the user's own commonest earlier answer (review summary) for the
                same rating among the events of the window, else the rating prior's. A
                reference from the user's past text, which the encoder and the text prompt
                (items, ratings, categories) read only as the frequent summaries that
                `data.text_categories` turns into categories: how much of the answer is the
                user's writing habit. Its `groups` split the test users by where their
                answer lies (`review_groups`): a repeat of the rating prior's answer, a
                repeat of the user's own earlier phrase, or new text; every review row is
                broken down by them (`paired.group_breakdown`)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from data_pipelines import timelines
from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.data import text_categories
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.eval import paired
from user_llm_jax.eval import popularity
from user_llm_jax.eval import probe
from user_llm_jax.eval import retrieval
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner


def ranking_procedure(vocab: schema.Vocabulary) -> str:
  return f"full-catalogue ranking of {vocab.num_items - 2} items, ties by item id"


def with_recall_stderr(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Adds `<metric>_stderr` to Recall@k / hit-rate style proportions."""
  out = dict(metrics)
  n = int(out.get("num_examples", 0))
  for key, value in metrics.items():
    if key.startswith("recall@") and not key.endswith("_stderr"):
      out[f"{key}_stderr"] = eval_lib.binomial_stderr(float(value), n)
  return out


def encoder_next_item(encoder: UserEncoder, data: runner.TaskData,
                      config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Full-catalogue Recall@K / NDCG@10 of an encoder's own next-item head (SASRec-style) on
  the seeded test sample, each record cropped to the window the encoder reads."""
  indices = runner.eval_indices(len(data.test), config.eval.num_examples, config.seed)
  batches = _ranking_batches([data.test[i] for i in indices], config)
  metrics = retrieval.evaluate_next_item(encoder, batches, ks=tuple(config.eval.ks),
                                         ids=indices)
  return dict(with_recall_stderr(metrics), procedure=ranking_procedure(data.vocab))


def _ranking_batches(records: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict):
  """The full-catalogue rankers' batches of `records`, cropped to the encoder's window."""
  return pipeline_lib.make_eval_pipeline(records, batch_size=64,
                                         transforms=[prepared.crop(config.data)])


def non_llm_baselines(encoder: UserEncoder | None, data: runner.TaskData,
                      config: ml_collections.ConfigDict,
                      transform: ex_lib.TaskExample | None = None,
                      ) -> dict[str, dict[str, dict[str, Any]]]:
  """{method: {task: metrics}} of the baselines above, on the seeded test sample.

  Args:
    encoder: the pretrained encoder (None: no SASRec-style row).
    data: the task data.
    config: the run's config (`tasks.names`, `eval.*`, `data.*`, `seed`).
    transform: record -> task example (needed for the review floor).
  """
  names = tuple(config.tasks.names)
  indices = runner.eval_indices(len(data.test), config.eval.num_examples, config.seed)
  records = [data.test[i] for i in indices]
  out: dict[str, dict[str, dict[str, Any]]] = {}
  if prompts.NEXT_ITEM in names:
    if encoder is not None:
      out["sasrec"] = {prompts.NEXT_ITEM: encoder_next_item(encoder, data, config)}
    counts = popularity.fit_item_counts(data.train, data.vocab.num_items)
    out["popularity"] = {prompts.NEXT_ITEM: dict(with_recall_stderr(
        popularity.evaluate_popularity(counts, _ranking_batches(records, config),
                                       ks=tuple(config.eval.ks), ids=indices)),
        procedure=ranking_procedure(data.vocab))}
  if prompts.FAVORITE_CATEGORY in names:
    out["majority"] = {prompts.FAVORITE_CATEGORY: majority_category(
        data.train, records, data.vocab, ids=indices)}
    out["count_window"] = {prompts.FAVORITE_CATEGORY: counted_category(
        records, data.vocab, int(config.data.window), ids=indices,
        max_categories=int(config.data.max_categories),
        what="the events the encoder reads")}
    if encoder is not None:
      out["probe"] = {prompts.FAVORITE_CATEGORY: probe.category_probe(
          encoder, data.train, records, data.vocab, config, ids=indices)}
  if prompts.REVIEW in names and transform is not None:
    by_rating = _review_answers_by_rating(data, transform)   # one pass over train for both
    out["rating_prior"] = {prompts.REVIEW: rating_prior_review(
        data, transform, indices, by_rating=by_rating)}
    past = past_answer_review(data, transform, indices, int(config.data.window),
                              by_rating=by_rating)
    past[paired.GROUPS] = review_groups(data, transform, indices, int(config.data.window),
                                        by_rating=by_rating)
    out["past_answer"] = {prompts.REVIEW: past}
  return out


def _review_answers_by_rating(data: runner.TaskData, transform: ex_lib.TaskExample
                              ) -> dict[int, collections.Counter]:
  """{rating token: Counter of the training records' review answers}."""
  by_rating: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in data.train:
    answer = transform.answer_text(dict(record), prompts.REVIEW)
    if answer is not None:
      by_rating[int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])][answer] += 1
  if not by_rating:
    raise ValueError("no training record has a review answer")
  return by_rating


def _window_events(n: int, window: int) -> range:
  """The event indices of the last `window` history events of an `n`-event record (its
  last event is the target)."""
  return range(max(0, n - 1 - window), n - 1)


def _commonest(counts: Mapping[str, int]) -> str:
  return min(counts, key=lambda a: (-counts[a], a))  # ties: alphabetical


def _prior_answer(by_rating: Mapping[int, collections.Counter]):
  """rating token -> the commonest training answer of that rating (of all ratings when the
  rating has none)."""
  overall = sum(by_rating.values(), collections.Counter())
  return lambda rating: _commonest(by_rating.get(rating, overall))


def _score_review_answers(data: runner.TaskData, transform: ex_lib.TaskExample,
                          indices: Sequence[int], answer_fn) -> dict[str, Any]:
  """ROUGE-Lsum of `answer_fn(record, rating token) -> answer` over the test records that
  have a reference answer (the records the LLMs are scored on)."""
  predictions, references, kept = [], [], []
  for i in indices:
    record = dict(data.test[i])
    answer = transform.answer_text(record, prompts.REVIEW)
    if answer is None:
      continue
    rating = int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])
    predictions.append(answer_fn(record, rating))
    references.append(answer)
    kept.append(i)
  scores = eval_lib.rouge_lsum_scores(predictions, references)
  mean, se = eval_lib.mean_stderr(scores)
  return {"rougeLsum": mean, "rougeLsum_stderr": se, "num_examples": len(references),
          paired.PER_EXAMPLE: paired.per_example(kept, {"rougeLsum": scores})}


def rating_prior_review(data: runner.TaskData, transform: ex_lib.TaskExample,
                        indices: Sequence[int], *,
                        by_rating: Mapping[int, collections.Counter] | None = None,
                        ) -> dict[str, Any]:
  """ROUGE-Lsum of answering each test review with the commonest training answer of its rating.

  The review prompt states the rating, so "Five Stars" for a 5 is learnable without any
  user context; this is the score a model reaches from the rating alone. `by_rating`: the
  training answers per rating when the caller has them already.
  """
  by_rating = by_rating or _review_answers_by_rating(data, transform)
  prior = _prior_answer(by_rating)
  metrics = _score_review_answers(data, transform, indices,
                                  lambda record, rating: prior(rating))
  return {**metrics,
          "answers": {str(data.vocab.ratings[r]) if r < data.vocab.num_ratings else str(r):
                      _commonest(c) for r, c in sorted(by_rating.items())},
          "procedure": "the most frequent training answer for the review's rating"}


def past_answer_review(data: runner.TaskData, transform: ex_lib.TaskExample,
                       indices: Sequence[int], window: int, *,
                       by_rating: Mapping[int, collections.Counter] | None = None,
                       ) -> dict[str, Any]:
  """ROUGE-Lsum of answering with the user's own commonest earlier review answer.

  For each test record: among its last `window` history events (the events the encoder
  reads) whose rating equals the target's, the commonest non-empty answer (ties: the most
  recent); without one, the rating prior's answer. A reference for what the user's writing
  habit adds to the rating, not a floor: the methods read past answers only as the frequent
  summaries `data.text_categories` adds. `used_past` counts the records answered from it.
  `by_rating`: as in `rating_prior_review`.
  """
  if window <= 0:
    raise ValueError(f"past_answer_review needs a positive window, got {window}")
  prior = _prior_answer(by_rating or _review_answers_by_rating(data, transform))
  used = [0]

  def answer(record: dict[str, Any], rating: int) -> str:
    texts = transform.review_answers(record)
    ratings = np.asarray(record[schema.RATINGS]).reshape(-1)
    counts: collections.Counter = collections.Counter()
    last_seen: dict[str, int] = {}
    for e in (_window_events(ratings.size, window) if texts else ()):
      if texts[e] and int(ratings[e]) == rating:
        counts[texts[e]] += 1
        last_seen[texts[e]] = e
    if not counts:
      return prior(rating)
    used[0] += 1
    return max(counts, key=lambda a: (counts[a], last_seen[a]))

  metrics = _score_review_answers(data, transform, indices, answer)
  return {**metrics, "used_past": used[0],
          "procedure": (f"the user's commonest earlier answer for the same rating among the "
                        f"last {window} history events, else the rating prior's ({used[0]} "
                        f"of {metrics['num_examples']} answered from the past)")}


def majority_category(train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
                      vocab: schema.Vocabulary,
                      ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Accuracy of always answering the most frequent training favorite category; with
  `ids` (one per test record) each labelled record's correctness is kept
  (`paired.PER_EXAMPLE`)."""
  labels = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in train], np.int64)
  labels = labels[labels >= schema.FIRST_ID]
  if not labels.size:
    raise ValueError("no training record has a favorite category label")
  counts = np.bincount(labels, minlength=vocab.num_categories)
  best = int(np.argmax(counts))  # ties: the smallest id
  truth = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in test], np.int64)
  labelled = truth >= schema.FIRST_ID  # the records the LLMs are scored on
  truth = truth[labelled]
  accuracy = float(np.mean(truth == best)) if truth.size else float("nan")
  extra = {}
  if ids is not None:
    if len(ids) != labelled.size:
      raise ValueError(f"{len(ids)} ids for {labelled.size} test records")
    extra[paired.PER_EXAMPLE] = paired.per_example(
        np.asarray(ids)[labelled], {"accuracy": (truth == best).astype(np.float64)})
  return {"accuracy": accuracy, "accuracy_stderr": eval_lib.binomial_stderr(accuracy, truth.size),
          "num_examples": int(truth.size), "answer": vocab.categories[best], **extra,
          "procedure": f"always the training majority label {vocab.categories[best]!r}"}


def counted_category(records: Sequence[Mapping[str, Any]], vocab: schema.Vocabulary,
                     last_events: int | Sequence[int], *, ids: Sequence[int] | None = None,
                     max_categories: int | None = None,
                     what: str = "the most recent events") -> dict[str, Any]:
  """Accuracy of counting: the label's rule applied to a method's view of the history.

  The favorite-category label is the most frequent category of the whole history
  (`events[:-1]`, ties to the most recent: `data_pipelines.timelines.favorite_category`).
  Applying that rule to the last `k` history events answers what an exact count over
  those events answers, so it tells what a method that reads them can reach by counting,
  and whether a method's answers use more than the events it reads.

  Args:
    records: test records (schema features; the label in `FAVORITE_CATEGORY`).
    vocab: the vocabulary (its category names for the procedure).
    last_events: how many of the most recent history events are counted: one number for
      every record, or one per record (e.g. what each text prompt shows).
    ids: one id per record; when given each labelled record's correctness is kept
      (`paired.PER_EXAMPLE`).
    max_categories: count only each event's first `max_categories` categories (the
      encoder's `data.max_categories`); None counts all.
    what: the view's name for the procedure string.

  Returns:
    The metrics dict: accuracy, its standard error, num_examples, procedure (and
    per-example values with `ids`). Records without a label are left out, as the LLM rows
    leave them out.

  Raises:
    ValueError: `last_events` or `ids` of another length than `records`, or a negative
      count.
  """
  counts = (np.full(len(records), int(last_events), np.int64) if np.ndim(last_events) == 0
            else np.asarray(last_events, np.int64).reshape(-1))
  if counts.size != len(records):
    raise ValueError(f"{counts.size} event counts for {len(records)} records")
  if counts.size and counts.min() < 0:
    raise ValueError(f"event counts must be >= 0, got {int(counts.min())}")
  if ids is not None and len(ids) != len(records):
    raise ValueError(f"{len(ids)} ids for {len(records)} test records")
  right, kept = [], []
  for r, (record, k) in enumerate(zip(records, counts)):
    truth = int(record[schema.FAVORITE_CATEGORY])
    if truth < schema.FIRST_ID:
      continue
    events = schema.split_categories(
        np.asarray(record[schema.CATEGORY_IDS]).reshape(-1),
        np.asarray(record[schema.CATEGORY_LENGTHS]).reshape(-1))[:-1]  # the history
    view = [list(c)[:max_categories] for c in events[len(events) - min(k, len(events)):]]
    # The rule's input: a flat id list and per-event lengths, the target event last.
    flat = np.asarray([c for cats in view for c in cats], np.int64)
    lengths = np.asarray([len(c) for c in view] + [0], np.int64)
    right.append(float(timelines.favorite_category(flat, lengths) == truth))
    kept.append(r)
  accuracy = float(np.mean(right)) if right else float("nan")
  view = (f"the last {int(counts[0])}" if counts.size and (counts == counts[0]).all()
          else f"the last {counts.mean():.1f} (mean)")
  out = {"accuracy": accuracy, "accuracy_stderr": eval_lib.binomial_stderr(accuracy, len(right)),
         "num_examples": len(right), "events_counted_mean": float(counts.mean()) if counts.size
         else 0.0,
         "procedure": f"the most frequent category of {view} history events ({what}; the "
                      "label's rule, which counts the whole history)"}
  if ids is not None:
    out[paired.PER_EXAMPLE] = paired.per_example(np.asarray(ids)[kept], {"accuracy": right})
  return out


# The review groups (`review_groups`), in report order.
REPEAT_PRIOR, REPEAT_OWN, NEW_TEXT = "repeat_prior", "repeat_own", "new"


def review_groups(data: runner.TaskData, transform: ex_lib.TaskExample,
                  indices: Sequence[int], window: int, *,
                  by_rating: Mapping[int, collections.Counter] | None = None,
                  ) -> dict[str, list[int]]:
  """The scored test records split by where their answer lies (ids of `data.test`).

  Answers compare normalised (`text_categories.normalise`: case and whitespace).

    repeat_prior  the answer occurs among the last `window` history events' answers and
                  is the rating prior's answer ("Five Stars" for a 5): a model of the
                  rating alone gets it
    repeat_own    it occurs among them and is not the prior's: the user's own phrase,
                  which only a method that reads the user's past words can copy
    new           it does not occur among them

  Where a method trails the user's own past answers, this says which part it misses.
  Records without a reference answer are left out, as every review row leaves them out.
  """
  prior = _prior_answer(by_rating or _review_answers_by_rating(data, transform))
  groups: dict[str, list[int]] = {REPEAT_PRIOR: [], REPEAT_OWN: [], NEW_TEXT: []}
  for i in indices:
    record = dict(data.test[i])
    answer = transform.answer_text(record, prompts.REVIEW)
    if answer is None:
      continue
    texts = transform.review_answers(record)
    past = {text_categories.normalise(texts[e]) for e in _window_events(len(texts), window)
            if texts[e]}
    key = text_categories.normalise(answer)
    rating = int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])
    if key not in past:
      groups[NEW_TEXT].append(int(i))
    elif key == text_categories.normalise(prior(rating)):
      groups[REPEAT_PRIOR].append(int(i))
    else:
      groups[REPEAT_OWN].append(int(i))
  return groups
