"""Non-LLM baselines of the task jobs, on the same seeded test records as the LLM rows.

  sasrec        next item: the pretrained encoder's own next-item head, full-catalogue
                ranking (the SASRec-style baseline)
  popularity    next item: training-split item counts, full-catalogue ranking
  majority      favorite category: always the commonest training label (the floor a
                personalized answer must beat)
  rating_prior  review: the commonest training answer for the review's rating, which the
                prompt states (the score a model reaches from the rating alone)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.eval import paired
from user_llm_jax.eval import popularity
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
    crop = [prepared.crop(config.data)]
    batches = lambda: pipeline_lib.make_eval_pipeline(records, batch_size=64, transforms=crop)
    ks = tuple(config.eval.ks)
    procedure = ranking_procedure(data.vocab)
    if encoder is not None:
      out["sasrec"] = {prompts.NEXT_ITEM: dict(with_recall_stderr(
          retrieval.evaluate_next_item(encoder, batches(), ks=ks, ids=indices)),
          procedure=procedure)}
    counts = popularity.fit_item_counts(data.train, data.vocab.num_items)
    out["popularity"] = {prompts.NEXT_ITEM: dict(with_recall_stderr(
        popularity.evaluate_popularity(counts, batches(), ks=ks, ids=indices)),
        procedure=procedure)}
  if prompts.FAVORITE_CATEGORY in names:
    out["majority"] = {prompts.FAVORITE_CATEGORY: majority_category(
        data.train, records, data.vocab, ids=indices)}
  if prompts.REVIEW in names and transform is not None:
    out["rating_prior"] = {prompts.REVIEW: rating_prior_review(data, transform, indices)}
  return out


def rating_prior_review(data: runner.TaskData, transform: ex_lib.TaskExample,
                        indices: Sequence[int]) -> dict[str, Any]:
  """ROUGE-Lsum of answering each test review with the commonest training answer of its rating.

  The review prompt states the rating, so "Five Stars" for a 5 is learnable without any
  user context; this is the score a model reaches from the rating alone.
  """
  by_rating: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in data.train:
    answer = transform.answer_text(dict(record), prompts.REVIEW)
    if answer is not None:
      by_rating[int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])][answer] += 1
  if not by_rating:
    raise ValueError("no training record has a review answer")
  overall = sum(by_rating.values(), collections.Counter())
  commonest = lambda counts: min(counts, key=lambda a: (-counts[a], a))  # ties: alphabetical
  predictions, references, kept = [], [], []
  for i in indices:
    record = dict(data.test[i])
    answer = transform.answer_text(record, prompts.REVIEW)
    if answer is None:
      continue  # the same records the LLMs are scored on
    rating = int(np.asarray(record[schema.RATINGS]).reshape(-1)[-1])
    predictions.append(commonest(by_rating.get(rating, overall)))
    references.append(answer)
    kept.append(i)
  scores = eval_lib.rouge_lsum_scores(predictions, references)
  mean, se = eval_lib.mean_stderr(scores)
  return {"rougeLsum": mean, "rougeLsum_stderr": se, "num_examples": len(references),
          paired.PER_EXAMPLE: paired.per_example(kept, {"rougeLsum": scores}),
          "answers": {str(data.vocab.ratings[r]) if r < data.vocab.num_ratings else str(r):
                      commonest(c) for r, c in sorted(by_rating.items())},
          "procedure": "the most frequent training answer for the review's rating"}


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
