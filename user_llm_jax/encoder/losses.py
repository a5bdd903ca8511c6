"""Masked next-event losses of encoder pretraining (pure functions, float32).

Reserved vocabulary columns (PAD, OOV) are never predicted: their logits are pushed to a
large negative value, and positions whose target is PAD or OOV carry no weight (an OOV
target has no learnable identity). Every mean divides by max(total weight, 1), so a batch
without any valid position gives a loss of exactly 0, never NaN.

The sampled next-item losses (`sampled_softmax_cross_entropy`, `gbce_loss`) score each
position's target against K uniform negatives (`uniform_negatives`), one draw shared by
the whole batch or one per position: their inputs are [B, E] target scores and [B, E, K]
negative scores, never [B, E, V].

Axis letters: B batch, E events, C category slots, V vocabulary, K sampled negatives.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from user_llm_jax.data import schema

# Finite (not -inf) so that a masked column times a zero weight never makes NaN.
_MASKED_LOGIT = -1e9


def mask_reserved(logits: jax.Array, fill: float = _MASKED_LOGIT) -> jax.Array:
  """Sets the PAD and OOV columns (the first `FIRST_ID`) of [..., V] logits to `fill`."""
  column = jnp.arange(logits.shape[-1])
  return jnp.where(column >= schema.FIRST_ID, logits, jnp.asarray(fill, logits.dtype))


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / max(sum(weights), 1)."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def target_weights(targets: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 weights: valid positions whose target is a real (non-reserved) id."""
  return (mask & (targets >= schema.FIRST_ID)).astype(jnp.float32)


def position_means(nll: jax.Array, correct: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every next-event loss's result from per-position values: (mean loss, mean accuracy,
  number of scored positions), the means weighted by `weights` (`masked_mean`)."""
  return masked_mean(nll, weights), masked_mean(correct, weights), jnp.sum(weights)


def full_context_mask(context_offset: jax.Array, length: int,
                      min_context: int) -> jax.Array:
  """Positions whose input context is complete up to `min_context` events.

  Args:
    context_offset: int[B] the user's events before each example's first input
      (`transforms.CONTEXT_OFFSET`; 0: the example starts at the user's first event).
    length: E, the example's positions.
    min_context: k >= 1.

  Returns:
    bool[B, E]: position e reads at least k events (e + 1 >= k), or reads the user's
    whole history (the example starts at the user's first event).
  """
  whole_history = jnp.asarray(context_offset, jnp.int32)[:, None] == 0     # [B, 1]
  long_enough = (jnp.arange(length) + 1 >= min_context)[None, :]           # [1, E]
  return whole_history | long_enough


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array,
                          mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked softmax cross-entropy over the real vocabulary.

  Args:
    logits: [B, E, V] scores.
    targets: int[B, E] target ids.
    mask: bool[B, E] positions to score.

  Returns:
    (mean loss, mean top-1 accuracy, number of scored positions).
  """
  logits = mask_reserved(logits.astype(jnp.float32))
  weights = target_weights(targets, mask)
  # Weightless positions get a harmless target so their (ignored) loss stays finite.
  safe = jnp.where(weights > 0, targets, schema.FIRST_ID)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)   # [B, E]
  correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
  return position_means(nll, correct, weights)


def reserved_bias(num_classes: int) -> jax.Array:
  """float32 [V]: a large negative value at the PAD and OOV columns, 0 elsewhere.

  Added to logits rather than selected with `mask_reserved`: the add's gradient is the
  identity, where a select costs another pass over the [..., V] gradient.
  """
  return mask_reserved(jnp.zeros((num_classes,), jnp.float32))


def _item_terms(logits: jax.Array, target_logits: jax.Array,
                safe_targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position (negative log-likelihood, correct) of the next-item softmax.

  Args:
    logits: [..., V] scores (reserved columns not yet masked).
    target_logits: [...] each position's score of its own target, computed by the caller
      on its own (a gather of the target's item vector), so that the loss's gradient with
      respect to the [..., V] logits is the softmax alone: no scatter of -1 into a
      [..., V] array, as `take_along_axis` on the logits would need.
    safe_targets: int[...] targets (real ids, or a harmless real id where unweighted).
  """
  logits = logits.astype(jnp.float32) + reserved_bias(logits.shape[-1])
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits.astype(jnp.float32)
  # Top-1 accuracy against the row maximum (the reduction logsumexp needs anyway) rather
  # than an argmax, whose (value, index) reduction is the slower one; a tie at the top
  # counts as correct. The target's own column is read from the same logits, so the
  # comparison is exact.
  frozen = jax.lax.stop_gradient(logits)
  at_target = jnp.take_along_axis(frozen, safe_targets[..., None], axis=-1)[..., 0]
  correct = (at_target >= jnp.max(frozen, axis=-1)).astype(jnp.float32)
  return nll, correct


def item_softmax_cross_entropy(
    logits: jax.Array, target_logits: jax.Array, targets: jax.Array,
    mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`softmax_cross_entropy` of the next item, given each position's target score.

  The same loss (up to rounding) and accuracy (ties at the top count as correct), in the
  form whose backward pass is one dense softmax over [B, E, V]: reserved columns masked by
  an added bias, the target's score from `target_logits` (see `_item_terms`).

  Args:
    logits: [B, E, V] scores of every item.
    target_logits: [B, E] each position's score of its target (`UserEncoder.target_scores`;
      any finite value where the target is PAD or OOV).
    targets: int[B, E] target ids.
    mask: bool[B, E] positions to score.

  Returns:
    (mean loss, mean top-1 accuracy, number of scored positions).
  """
  weights = target_weights(targets, mask)
  safe = jnp.where(weights > 0, targets, schema.FIRST_ID)
  nll, correct = _item_terms(logits, target_logits, safe)
  return position_means(nll, correct, weights)


def chunked_softmax_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array],
    target_fn: Callable[[jax.Array, jax.Array], jax.Array], states: jax.Array,
    targets: jax.Array, mask: jax.Array,
    chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`item_softmax_cross_entropy` in chunks of positions.

  Only [chunk_size, V] logits are live at a time, forward and backward (each chunk is
  rematerialized), so a catalogue of 10^5+ items fits at batch 128 x window 50.

  Args:
    logits_fn: [N, D] states -> [N, V] logits.
    target_fn: ([N, D] states, int[N] ids) -> [N] each state's score of its id.
    states: [B, E, D] encoder states.
    targets: int[B, E] target ids.
    mask: bool[B, E] positions to score.
    chunk_size: positions per chunk.

  Returns:
    (mean loss, mean top-1 accuracy, number of scored positions), as the unchunked form.
  """
  b, e, d = states.shape
  n = b * e
  pad = (-n) % chunk_size
  weights = jnp.pad(target_weights(targets, mask).reshape(n), (0, pad))
  safe = jnp.pad(jnp.where(target_weights(targets, mask) > 0, targets,
                           schema.FIRST_ID).reshape(n), (0, pad),
                 constant_values=schema.FIRST_ID)
  flat = jnp.pad(states.reshape(n, d), ((0, pad), (0, 0)))
  chunks = n // chunk_size + (pad > 0)
  xs = (flat.reshape(chunks, chunk_size, d), safe.reshape(chunks, chunk_size),
        weights.reshape(chunks, chunk_size))

  @jax.checkpoint
  def body(carry, x):
    s, t, w = x                                                             # [N, D], [N], [N]
    nll, correct = _item_terms(logits_fn(s), target_fn(s, t), t)
    return (carry[0] + jnp.sum(nll * w), carry[1] + jnp.sum(correct * w)), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, correct_sum), _ = jax.lax.scan(body, (zero, zero), xs)
  total = jnp.sum(weights)
  denominator = jnp.maximum(total, 1.0)
  return nll_sum / denominator, correct_sum / denominator, total


def uniform_negatives(key: jax.Array, num_negatives: int, num_items: int,
                      batch_shape: tuple[int, ...] = ()) -> jax.Array:
  """int32[*batch_shape, K] item ids drawn uniformly, with replacement, from the real
  catalogue.

  Args:
    key: PRNG key.
    num_negatives: K.
    num_items: vocabulary size including the reserved ids, which are never drawn.
    batch_shape: () for one draw shared by every position, (B, E) for one per position.
  """
  return jax.random.randint(key, (*batch_shape, num_negatives), schema.FIRST_ID, num_items,
                            jnp.int32)


def gbce_beta(num_negatives: int, num_real_items: int, t: float) -> float:
  """gSASRec's exponent of the positive's probability, beta = alpha (t (1 - 1/alpha) + 1/alpha).

  alpha = K / (num_real_items - 1) is the paper's negative sampling rate, the share of
  the other items drawn as negatives per position (K draws with replacement here, so it
  may exceed 1). beta = 1 + t (alpha - 1): t = 0 gives beta = 1 (plain binary
  cross-entropy), t = 1 gives beta = alpha (the paper's fully calibrated model).

  Args:
    num_negatives: K.
    num_real_items: the catalogue without the reserved ids (>= 2).
    t: the calibration parameter in [0, 1].
  """
  alpha = num_negatives / (num_real_items - 1)
  return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def _sampled_inputs(positive_logits: jax.Array, negative_logits: jax.Array,
                    targets: jax.Array,
                    negatives: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """float32 [B, E] and [B, E, K] scores, the kept negatives (bool[B, E, K]: not the
  position's own target), and whether the target outscores every kept negative."""
  positive = positive_logits.astype(jnp.float32)                          # [B, E]
  negative = negative_logits.astype(jnp.float32)                          # [B, E, K]
  keep = targets[..., None] != negatives                                  # [B, E, K]
  best = jnp.max(jnp.where(keep, negative, -jnp.inf), axis=-1)            # [B, E]
  correct = (positive > best).astype(jnp.float32)
  return positive, negative, keep, correct


def sampled_softmax_cross_entropy(
    positive_logits: jax.Array, negative_logits: jax.Array, targets: jax.Array,
    negatives: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked cross-entropy over [target, K sampled negatives] at every position.

  A negative equal to the position's target is masked out there, so the target is never
  also a negative. Sampled softmax subtracts log Q(item) from every candidate's logit;
  with uniform sampling log Q is one constant, which a softmax ignores, so it is left out.

  Args:
    positive_logits: [B, E] scores of each position's target.
    negative_logits: [B, E, K] scores of each position's negatives.
    targets: int[B, E] target ids.
    negatives: int[K] the negatives' ids (shared by every position), or int[B, E, K].
    mask: bool[B, E] positions to score.

  Returns:
    (mean loss, mean sampled accuracy: the target outscores every kept negative,
    number of scored positions).
  """
  positive, negative, keep, correct = _sampled_inputs(
      positive_logits, negative_logits, targets, negatives)
  negative = jnp.where(keep, negative, _MASKED_LOGIT)
  logits = jnp.concatenate([positive[..., None], negative], axis=-1)      # [B, E, 1 + K]
  nll = jax.nn.logsumexp(logits, axis=-1) - positive                      # [B, E]
  return position_means(nll, correct, target_weights(targets, mask))


def gbce_loss(positive_logits: jax.Array, negative_logits: jax.Array, targets: jax.Array,
              negatives: jax.Array, mask: jax.Array, *,
              beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked generalised binary cross-entropy (gSASRec, Petrov & Macdonald, RecSys 2023).

  Per position, as the paper defines it:
    -(log sigmoid(s+)^beta + sum_k log(1 - sigmoid(s_k))) / (K + 1),
  computed as -(beta log_sigmoid(s+) + sum_k log_sigmoid(-s_k)) / (K + 1), which stays
  finite for any score. A negative equal to the position's target is dropped there (its
  term is 0; the divisor stays K + 1).

  Args:
    positive_logits: [B, E] scores of each position's target.
    negative_logits: [B, E, K] scores of each position's negatives.
    targets: int[B, E] target ids.
    negatives: int[K] the negatives' ids (shared by every position), or int[B, E, K].
    mask: bool[B, E] positions to score.
    beta: the exponent of the positive's probability (`gbce_beta`).

  Returns:
    (mean loss, mean sampled accuracy: the target outscores every kept negative,
    number of scored positions).
  """
  positive, negative, keep, correct = _sampled_inputs(
      positive_logits, negative_logits, targets, negatives)
  negative_terms = jnp.sum(jnp.where(keep, jax.nn.log_sigmoid(-negative), 0.0), axis=-1)
  nll = -(beta * jax.nn.log_sigmoid(positive) + negative_terms) / (negatives.shape[-1] + 1)
  return position_means(nll, correct, target_weights(targets, mask))


def multi_hot(ids: jax.Array, num_classes: int) -> jax.Array:
  """int[B, E, C] ids -> float32[B, E, V] multi-hot labels (PAD/OOV columns stay 0).

  A scatter rather than a one-hot sum: memory B*E*V instead of B*E*C*V, which matters
  for category vocabularies of thousands (Google Local).
  """
  b, e, c = ids.shape
  bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], ids.shape)
  ei = jnp.broadcast_to(jnp.arange(e)[None, :, None], ids.shape)
  labels = jnp.zeros((b, e, num_classes), jnp.float32)
  labels = labels.at[bi, ei, ids].max(jnp.ones((b, e, c), jnp.float32), mode="drop")
  return mask_reserved(labels, 0.0)


def multi_label_loss(logits: jax.Array, target_ids: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Masked sigmoid binary cross-entropy, averaged over the real category columns.

  Args:
    logits: [B, E, V] category scores.
    target_ids: int[B, E, C] the next event's category ids (PAD-padded).
    mask: bool[B, E] positions to score; positions whose next event has no real category
      carry no weight.

  Returns:
    Scalar mean loss.
  """
  num_classes = logits.shape[-1]
  labels = multi_hot(target_ids, num_classes)                             # [B, E, V]
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
  real = (jnp.arange(num_classes) >= schema.FIRST_ID).astype(jnp.float32)  # [V]
  per_position = jnp.sum(bce * real, axis=-1) / jnp.sum(real)              # [B, E]
  has_label = jnp.any(target_ids >= schema.FIRST_ID, axis=-1)
  return masked_mean(per_position, (mask & has_label).astype(jnp.float32))
