"""The user encoder: a causal transformer over multimodal user events.

Reads the fixed-shape examples of `data.transforms.CropAndPad` and returns one embedding
per event: the embedding at position t summarizes events 0..t (the LLM bridges read
these). Pretrained self-supervised by predicting every feature of the next event.

Parameters are created with logical axis names as metadata only (no eager sharding):
build the model anywhere, then place it with `sharding.shard_model` or a jitted init
with `sharding.model_shardings` as out_shardings (both read the active rules).

Axis letters: B batch, E events, D width, F feature_dim, V vocabulary, K scored items,
Q the item head's query width (F tied, D separate).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import losses
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.encoder.fusion import EarlyFusion, FeatureEmbeddings, LateFusion
from user_llm_jax.encoder.transformer import dense, layer_norm
from user_llm_jax.sharding import partitioned

Batch = dict[str, Any]

# Keys `__call__` reads; the pretraining loss also reads the targets.
INPUT_KEYS = (T.INPUTS_ITEM, T.INPUTS_RATING, T.INPUTS_CATEGORY, T.INPUTS_TIME, T.MASK)


class UserEncoder(nnx.Module):
  """Multimodal autoregressive user encoder with next-event prediction heads.

  Attributes:
    cfg: the architecture.
    features: one embedding table per event feature.
    fusion: `EarlyFusion` or `LateFusion` (by `cfg.fusion`).
    final_norm: LayerNorm applied to the fused states (Pre-LN only; a Post-LN model
      holds it unused, so that both forms draw the same parameters from one seed).
    negative_rngs: the `negatives` RNG stream of the sampled item losses (None with
      `item_loss='softmax'`, so a default model's RNG streams are only its dropout's).
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.features = FeatureEmbeddings(cfg, rngs=rngs)
    self.fusion = (EarlyFusion if cfg.fusion == "early" else LateFusion)(cfg, rngs=rngs)
    self.final_norm = layer_norm(cfg, rngs=rngs)
    if cfg.tie_item_head:
      # Tied head: D -> F, then a dot product with the item table (+ per-item bias).
      self.item_query = dense(cfg.width, cfg.feature_dim, "embed", "features", cfg, rngs=rngs)
      bias = partitioned(nnx.initializers.zeros_init(), ("vocab",))(
          rngs.params(), (cfg.num_items,), cfg.param_dtype)  # drawn either way: same seeds
      self.item_bias = nnx.Param(bias) if cfg.item_bias else None
      self.item_head = None
    else:
      self.item_query = None
      self.item_bias = None
      self.item_head = dense(cfg.width, cfg.num_items, "embed", "vocab", cfg, rngs=rngs)
    # One learned scalar on the score of every item the input window already holds (no
    # RNG drawn: the other parameters equal those of a model without it, seed for seed).
    self.repeat_bias = (nnx.Param(jnp.zeros((), cfg.param_dtype)) if cfg.repeat_bias
                        else None)
    self.rating_head = dense(cfg.width, cfg.num_ratings, "embed", "vocab", cfg, rngs=rngs)
    self.category_head = dense(cfg.width, cfg.num_categories, "embed", "vocab", cfg,
                               rngs=rngs)
    # Seeded last, so a sampled-loss model's parameters equal the softmax model's of the
    # same seed. A train step reseeds it from (seed, step) like dropout.
    self.negative_rngs = (None if cfg.item_loss == "softmax"
                          else nnx.Rngs(negatives=rngs.params()))

  def _check(self, batch: Batch) -> None:
    missing = [k for k in INPUT_KEYS if k not in batch]
    if missing:
      raise KeyError(f"encoder batch lacks {missing}; expected the keys of "
                     f"data.transforms.CropAndPad, got {sorted(batch)}")
    length = batch[T.INPUTS_ITEM].shape[-1]
    if length > self.cfg.max_len:
      raise ValueError(f"batch has {length} event positions but EncoderConfig.max_len is "
                       f"{self.cfg.max_len}")

  def __call__(self, batch: Batch, *, deterministic: bool = True) -> jax.Array:
    """Per-event user embeddings.

    Args:
      batch: `CropAndPad` features with a leading batch axis.
      deterministic: disable dropout (False during training).

    Returns:
      [B, E, D] embeddings; position t depends only on the valid events 0..t.
    """
    self._check(batch)
    mask = jnp.asarray(batch[T.MASK], bool)                               # [B, E]
    features = self.features(batch)                                       # n x [B, E, F]
    x = self.fusion(features, mask, deterministic=deterministic)          # [B, E, D]
    if self.cfg.norm_position == "pre":  # Post-LN blocks end normalised already.
      x = self.final_norm(x)
    return sharding.with_logical_constraint(x, sharding.ACT_BTD)

  def item_logits(self, states: jax.Array) -> jax.Array:
    """[..., D] states -> float32 [..., num_items] next-item scores (reserved ids included)."""
    if self.item_head is not None:
      return self.item_head(states).astype(jnp.float32)
    query = self.item_query(states)                                       # [..., F]
    scores = self.features.attend_items(query).astype(jnp.float32)        # [..., V]
    if self.item_bias is None:
      return scores
    return scores + self.item_bias[...].astype(jnp.float32)

  def _repeat_term(self, read: jax.Array) -> jax.Array:
    """float32 `repeat_bias` where bool `read` is set, 0 elsewhere."""
    return jnp.where(read, self.repeat_bias[...].astype(jnp.float32), 0.0)

  def _item_factors(self, states: jax.Array,
                    ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The query [..., Q] of `states`, the head's vectors [*ids.shape, Q] and biases
    [*ids.shape] of items `ids`, gathered so that only those items are scored."""
    dtype = self.cfg.dtype
    if self.item_head is not None:
      kernel = self.item_head.kernel[...]                                 # [D, V]
      vectors = jnp.take(kernel, ids, axis=1)                             # [D, *ids]
      vectors = jnp.moveaxis(vectors, 0, -1)                              # [*ids, D]
      bias = jnp.take(self.item_head.bias[...], ids)
      return states.astype(dtype), vectors.astype(dtype), bias
    query = self.item_query(states)                                       # [..., F]
    vectors = jnp.take(self.features.item.embedding[...], ids, axis=0)   # [*ids, F]
    bias = (jnp.zeros(ids.shape, jnp.float32) if self.item_bias is None
            else jnp.take(self.item_bias[...], ids))
    return query.astype(dtype), vectors.astype(dtype), bias

  def _add_item_bias(self, scores: jax.Array, bias: jax.Array) -> jax.Array:
    # The same arithmetic as `item_logits`: the separate head adds its bias in the compute
    # dtype (inside the Linear), the tied head in float32.
    if self.item_head is not None:
      return (scores + bias.astype(scores.dtype)).astype(jnp.float32)
    return scores.astype(jnp.float32) + bias.astype(jnp.float32)

  def item_scores(self, states: jax.Array, ids: jax.Array) -> jax.Array:
    """Scores of the items `ids` only: columns `ids` of `item_logits(states)`.

    Args:
      states: [..., D] encoder states.
      ids: int[K] item ids, shared by every state.

    Returns:
      float32 [..., K]; the [..., num_items] logits are never built.
    """
    query, vectors, bias = self._item_factors(states, ids)
    return self._add_item_bias(jnp.einsum("...q,kq->...k", query, vectors), bias)

  def target_scores(self, states: jax.Array, ids: jax.Array) -> jax.Array:
    """Each state's score of its own item: `item_logits(states)[..., ids]` elementwise.

    Args:
      states: [..., D] encoder states.
      ids: int[...] one item id per state.

    Returns:
      float32 [...].
    """
    query, vectors, bias = self._item_factors(states, ids)
    return self._add_item_bias(jnp.einsum("...q,...q->...", query, vectors), bias)

  def _sampled_item_loss(self, states: jax.Array, targets: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cfg.item_loss` over each target and K uniform negatives: one [K] draw for the
    batch, or a [B, E, K] draw (`cfg.negatives_per`)."""
    cfg = self.cfg
    targets = jnp.asarray(targets, jnp.int32)
    per_position = cfg.negatives_per == "position"
    negatives = losses.uniform_negatives(
        self.negative_rngs.negatives(), cfg.item_negatives, cfg.num_items,
        targets.shape if per_position else ())                            # [K] / [B, E, K]
    positive = self.target_scores(states, targets)                        # [B, E]
    if per_position:
      negative = self.target_scores(states[..., None, :], negatives)      # [B, E, K]
    else:
      negative = self.item_scores(states, negatives)                      # [B, E, K]
    if cfg.item_loss == "gbce":
      beta = losses.gbce_beta(cfg.item_negatives, cfg.num_items - schema.FIRST_ID, cfg.gbce_t)
      return losses.gbce_loss(positive, negative, targets, negatives, mask, beta=beta)
    return losses.sampled_softmax_cross_entropy(positive, negative, targets, negatives, mask)

  def pretrain_loss(self, batch: Batch, *,
                    deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted next-event loss at every valid position (in training, those with enough
    context when `cfg.loss_min_context` is set).

    Item: `cfg.item_loss` in training; with `deterministic` (evaluation) nothing is
    sampled and the item loss is the full softmax cross-entropy, comparable across item
    losses. Rating: softmax cross-entropy over the real vocabulary; categories: sigmoid
    multi-label loss. Positions of padding examples (`example_mask` False) are ignored.

    Returns:
      (scalar loss, metrics of scalars: per-feature losses and accuracies, positions).
    """
    cfg = self.cfg
    states = self(batch, deterministic=deterministic)                    # [B, E, D]
    mask = jnp.asarray(batch[T.MASK], bool)
    if T.EXAMPLE_MASK in batch:
      mask = mask & jnp.asarray(batch[T.EXAMPLE_MASK], bool)[:, None]
    if cfg.loss_min_context and not deterministic:
      if T.CONTEXT_OFFSET not in batch:
        raise KeyError(f"EncoderConfig.loss_min_context={cfg.loss_min_context} needs the "
                       f"batch's {T.CONTEXT_OFFSET!r} (random training windows: "
                       f"data.train_windows='random'); got keys {sorted(batch)}")
      mask = mask & losses.full_context_mask(batch[T.CONTEXT_OFFSET], mask.shape[1],
                                             cfg.loss_min_context)
    if cfg.item_loss != "softmax" and not deterministic:
      item_loss, item_acc, positions = self._sampled_item_loss(
          states, batch[T.TARGETS_ITEM], mask)
    elif cfg.item_loss_chunk:
      item_loss, item_acc, positions = losses.chunked_softmax_cross_entropy(
          self.item_logits, self.target_scores, states, batch[T.TARGETS_ITEM], mask,
          cfg.item_loss_chunk)
    else:
      targets = jnp.asarray(batch[T.TARGETS_ITEM], jnp.int32)
      logits, target_logits = self.item_logits(states), self.target_scores(states, targets)
      if self.repeat_bias is not None:
        items, valid = batch[T.INPUTS_ITEM], jnp.asarray(batch[T.MASK], bool)
        logits = logits + self._repeat_term(window_items(items, valid, cfg.num_items))
        target_logits = target_logits + self._repeat_term(
            target_in_window(items, valid, targets))
      item_loss, item_acc, positions = losses.item_softmax_cross_entropy(
          logits, target_logits, targets, mask)
    zero = jnp.zeros((), jnp.float32)
    # A loss of weight 0 is not computed: it costs time, and a category vocabulary of
    # reserved ids alone (a dataset without categories) has no column to average over.
    rating_loss, rating_acc = zero, zero
    if cfg.rating_loss_weight > 0:
      rating_loss, rating_acc, _ = losses.softmax_cross_entropy(
          self.rating_head(states), batch[T.TARGETS_RATING], mask)
    category_loss = zero
    if cfg.category_loss_weight > 0:
      category_loss = losses.multi_label_loss(
          self.category_head(states), batch[T.TARGETS_CATEGORY], mask)
    loss = (cfg.item_loss_weight * item_loss + cfg.rating_loss_weight * rating_loss
            + cfg.category_loss_weight * category_loss)
    metrics = {
        "item_loss": item_loss, "rating_loss": rating_loss, "category_loss": category_loss,
        "item_accuracy": item_acc, "rating_accuracy": rating_acc,
        "positions": positions,
    }
    return loss, metrics

  def next_item_logits(self, batch: Batch) -> jax.Array:
    """Scores of every item for the record's target (the event after `last_index`).

    Returns:
      float32 [B, num_items]; PAD and OOV columns are -inf, so rankings cover only the
      real catalogue.
    """
    states = self(batch, deterministic=True)                              # [B, E, D]
    last = jnp.asarray(batch[T.LAST_INDEX], jnp.int32)                   # [B]
    last_state = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return losses.mask_reserved(self.last_item_logits(last_state, batch), -jnp.inf)

  def last_item_logits(self, last_state: jax.Array, batch: Batch) -> jax.Array:
    """`item_logits` of the state at each example's `last_index`, plus the repeat bias on
    the items the example's events up to there hold (`cfg.repeat_bias`): the next-item
    scores of a record's target. float32 [B, num_items], reserved columns not masked."""
    logits = self.item_logits(last_state)
    if self.repeat_bias is not None:
      logits = logits + self._repeat_term(read_items(batch, self.cfg.num_items))
    return logits


def _item_one_hot(items: jax.Array, valid: jax.Array, num_items: int) -> jax.Array:
  """int8 [B, E, V]: 1 at (b, e, items[b, e]) where `valid` and the id is a real item."""
  items = jnp.asarray(items, jnp.int32)
  real = valid & (items >= schema.FIRST_ID) & (items < num_items)
  return jax.nn.one_hot(jnp.where(real, items, -1), num_items, dtype=jnp.int8)


def window_items(items: jax.Array, valid: jax.Array, num_items: int) -> jax.Array:
  """bool[B, E, V]: at position e, the real items among the valid events 0..e (what the
  model has read when it predicts the event after e).

  A one-hot and a running maximum along the events: dense work of the logits' shape,
  no scatter (TPU-friendly).
  """
  return jax.lax.cummax(_item_one_hot(items, valid, num_items), axis=1) > 0


def target_in_window(items: jax.Array, valid: jax.Array, targets: jax.Array) -> jax.Array:
  """bool[B, E]: whether each position's target is one of the valid events 0..e, i.e.
  `window_items(...)[b, e, targets[b, e]]` without building [B, E, V]."""
  e = items.shape[1]
  causal = jnp.arange(e)[None, :, None] >= jnp.arange(e)[None, None, :]   # [1, E, E']
  same = jnp.asarray(targets)[:, :, None] == jnp.asarray(items)[:, None, :]  # [B, E, E']
  real = jnp.asarray(targets) >= schema.FIRST_ID
  return jnp.any(same & causal & valid[:, None, :], axis=-1) & real


def read_items(batch: Batch, num_items: int) -> jax.Array:
  """bool[B, V]: the real items of each example's events up to `last_index` (what
  `next_item_logits` reads)."""
  items = batch[T.INPUTS_ITEM]
  last = jnp.asarray(batch[T.LAST_INDEX], jnp.int32)
  valid = jnp.asarray(batch[T.MASK], bool) & (jnp.arange(items.shape[1])[None, :]
                                              <= last[:, None])
  return jnp.any(_item_one_hot(items, valid, num_items) > 0, axis=1)
