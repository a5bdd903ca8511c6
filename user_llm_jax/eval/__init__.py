"""Evaluation: full-catalogue retrieval metrics and baselines."""

from user_llm_jax.eval.popularity import evaluate_popularity, fit_item_counts
from user_llm_jax.eval.retrieval import (
    RetrievalAccumulator,
    evaluate_next_item,
    evaluate_scores,
    ndcg_at_k,
    recall_at_k,
    target_ranks,
)
