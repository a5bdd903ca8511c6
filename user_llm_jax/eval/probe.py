"""Linear probe: what a linear read-out of the encoder's states knows about a user label.

User-LLM reads the user through the encoder's per-event states. When it misses a label
that its input determines (the favorite category is a count over the history), either the
states have lost it or the bridge and LLM have not learned to read it. The probe tells the
two apart: a softmax regression from the states, mean-pooled over the valid events (what an
attention layer that spreads its weight evenly reads), to the label, fitted on the training
records and scored on the same seeded test records as the LLM rows.

  pooled_states(...)      [N, D] mean of each record's encoder states over its events
  state_statistics(...)   per-dimension mean and spread of the states over all events (the
                          bridge's `standardize_states` starts from them)
  fit_softmax_probe(...)  weights of an L2-regularised softmax regression (full batch, Adam)
  category_probe(...)     the probe's favorite-category metrics for a task job's report
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from user_llm_jax.data import pipeline as pipeline_lib
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.eval import paired
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import runner

# Training records the probe is fitted on at most (a seeded sample beyond it).
MAX_TRAIN_RECORDS = 5000


def _encoded(encoder: UserEncoder, records: Sequence[Mapping[str, Any]],
             data: ml_collections.ConfigDict, batch_size: int,
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(float32 states [B, E, D], bool valid events [B, E], bool real examples [B]) of each
  batch of `records` as the encoder reads them (`prepared.crop(data)`, deterministic)."""
  for batch in pipeline_lib.make_eval_pipeline(records, batch_size=batch_size,
                                               transforms=[prepared.crop(data)]):
    real = np.asarray(batch[T.EXAMPLE_MASK], bool)
    valid = np.asarray(batch[T.MASK], bool) & real[:, None]
    yield np.asarray(encoder(batch, deterministic=True), np.float32), valid, real


def pooled_states(encoder: UserEncoder, records: Sequence[Mapping[str, Any]],
                  data: ml_collections.ConfigDict, *, batch_size: int = 64) -> np.ndarray:
  """float32 [N, D]: each record's encoder states averaged over its valid events.

  Args:
    encoder: the encoder (evaluated deterministically).
    records: schema records; the encoder reads `prepared.crop(data)` of each (its window).
    data: the config's `data` section (`window`, `max_categories`).
    batch_size: records per forward pass.
  """
  rows = []
  for states, valid, real in _encoded(encoder, records, data, batch_size):
    weights = valid[..., None].astype(np.float32)                          # [B, E, 1]
    pooled = (states * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
    rows.append(pooled[real])
  return np.concatenate(rows, 0) if rows else np.zeros((0, 0), np.float32)


def state_statistics(encoder: UserEncoder, records: Sequence[Mapping[str, Any]],
                     data: ml_collections.ConfigDict, *, batch_size: int = 64,
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], standard deviation [D]) of the encoder's states over every valid event of
  `records` (float64 sums; what `UserLLM.init_state_standardization` takes).

  Raises:
    ValueError: the records hold no valid event.
  """
  total, squares, count = 0.0, 0.0, 0
  for states, valid, _ in _encoded(encoder, records, data, batch_size):
    x = states[valid].astype(np.float64)
    total, squares, count = total + x.sum(0), squares + np.square(x).sum(0), count + len(x)
  if not count:
    raise ValueError(f"no valid event in {len(records)} records: no state statistics")
  mean = total / count
  return mean, np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))


def fit_softmax_probe(x: np.ndarray, y: np.ndarray, num_classes: int, *, steps: int = 500,
                      learning_rate: float = 0.05, l2: float = 1e-3,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """An L2-regularised softmax regression on standardised features (deterministic).

  Args:
    x: [N, D] features.
    y: int[N] labels in [0, num_classes).
    num_classes: number of classes.
    steps: full-batch Adam steps.
    learning_rate: Adam's learning rate.
    l2: weight of the mean squared weight in the loss.

  Returns:
    (mean [D], scale [D], weights [D, C], bias [C]): predict with
    argmax(((x - mean) / scale) @ weights + bias).

  Raises:
    ValueError: no examples, or a label outside [0, num_classes).
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32).reshape(-1)
  if not len(y) or len(x) != len(y):
    raise ValueError(f"probe needs as many feature rows as labels (> 0); got {len(x)} "
                     f"rows and {len(y)} labels")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"probe labels must lie in [0, {num_classes}); got "
                     f"[{y.min()}, {y.max()}]")
  mean, scale = x.mean(0), x.std(0) + 1e-6
  z = jnp.asarray((x - mean) / scale)
  labels = jnp.asarray(y)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  optimizer = optax.adam(learning_rate)

  def loss_fn(p):
    logits = z @ p["w"] + p["b"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return nll + l2 * jnp.mean(jnp.square(p["w"]))

  @jax.jit
  def step(p, state):
    grads = jax.grad(loss_fn)(p)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state = optimizer.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return mean, scale, np.asarray(params["w"]), np.asarray(params["b"])


def predict(probe: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
            x: np.ndarray) -> np.ndarray:
  """int[N] argmax predictions of a `fit_softmax_probe` result."""
  mean, scale, w, b = probe
  return np.argmax(((np.asarray(x, np.float32) - mean) / scale) @ w + b, axis=-1)


def category_probe(encoder: UserEncoder, train: Sequence[Mapping[str, Any]],
                   test_records: Sequence[Mapping[str, Any]], vocab: schema.Vocabulary,
                   config: ml_collections.ConfigDict, *, ids: Sequence[int],
                   ) -> dict[str, Any]:
  """Favorite-category accuracy of a linear probe of the encoder's mean-pooled states.

  Fitted on (a seeded sample of at most `MAX_TRAIN_RECORDS` of) the labelled training
  records, scored on the labelled `test_records` (one id each, as the LLM rows).

  Raises:
    ValueError: no labelled training record, or `ids` of another length.
  """
  if len(ids) != len(test_records):
    raise ValueError(f"{len(ids)} ids for {len(test_records)} test records")
  fit_records = [train[i] for i in runner.eval_indices(len(train), MAX_TRAIN_RECORDS,
                                                        config.seed)]
  labels = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in fit_records])
  keep = labels >= schema.FIRST_ID
  if not keep.any():
    raise ValueError("no training record has a favorite category label")
  fit_records = [r for r, k in zip(fit_records, keep) if k]
  probe = fit_softmax_probe(pooled_states(encoder, fit_records, config.data), labels[keep],
                            vocab.num_categories)
  truth = np.asarray([int(r[schema.FAVORITE_CATEGORY]) for r in test_records])
  labelled = truth >= schema.FIRST_ID
  kept = [r for r, k in zip(test_records, labelled) if k]
  right = (predict(probe, pooled_states(encoder, kept, config.data)) == truth[labelled]
           ) if kept else np.zeros((0,), bool)
  accuracy = float(right.mean()) if right.size else float("nan")
  return {"accuracy": accuracy,
          "accuracy_stderr": eval_lib.binomial_stderr(accuracy, int(right.size)),
          "num_examples": int(right.size), "train_records": int(keep.sum()),
          paired.PER_EXAMPLE: paired.per_example(np.asarray(ids)[labelled],
                                                 {"accuracy": right.astype(np.float64)}),
          "procedure": ("softmax regression (L2, 500 full-batch Adam steps) from the "
                        "pretrained encoder's states, mean-pooled over the events it reads, "
                        f"fitted on {int(keep.sum())} training records")}
