"""The user encoder: a causal transformer over multimodal user events.

Reads the fixed-shape examples of `data.transforms.CropAndPad` and returns one embedding
per event: the embedding at position t summarizes events 0..t (the LLM bridges read
these). Pretrained self-supervised by predicting every feature of the next event.

Parameters are created with logical axis names as metadata only (no eager sharding):
build the model anywhere, then place it with `sharding.shard_model` or a jitted init
with `sharding.model_shardings` as out_shardings (both read the active rules).

Axis letters: B batch, E events, D width, F feature_dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import sharding
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
    final_norm: LayerNorm applied to the fused states.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.features = FeatureEmbeddings(cfg, rngs=rngs)
    self.fusion = (EarlyFusion if cfg.fusion == "early" else LateFusion)(cfg, rngs=rngs)
    self.final_norm = layer_norm(cfg, rngs=rngs)
    if cfg.tie_item_head:
      # Tied head: D -> F, then a dot product with the item table (+ per-item bias).
      self.item_query = dense(cfg.width, cfg.feature_dim, "embed", "features", cfg, rngs=rngs)
      self.item_bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("vocab",))(
          rngs.params(), (cfg.num_items,), cfg.param_dtype))
      self.item_head = None
    else:
      self.item_query = None
      self.item_bias = None
      self.item_head = dense(cfg.width, cfg.num_items, "embed", "vocab", cfg, rngs=rngs)
    self.rating_head = dense(cfg.width, cfg.num_ratings, "embed", "vocab", cfg, rngs=rngs)
    self.category_head = dense(cfg.width, cfg.num_categories, "embed", "vocab", cfg,
                               rngs=rngs)

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
    x = self.final_norm(x)
    return sharding.with_logical_constraint(x, sharding.ACT_BTD)

  def item_logits(self, states: jax.Array) -> jax.Array:
    """[..., D] states -> float32 [..., num_items] next-item scores (reserved ids included)."""
    if self.item_head is not None:
      return self.item_head(states).astype(jnp.float32)
    query = self.item_query(states)                                       # [..., F]
    scores = self.features.attend_items(query).astype(jnp.float32)        # [..., V]
    return scores + self.item_bias[...].astype(jnp.float32)

  def pretrain_loss(self, batch: Batch, *,
                    deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted next-event loss at every valid position.

    Item and rating: softmax cross-entropy over the real vocabulary; categories: sigmoid
    multi-label loss. Positions of padding examples (`example_mask` False) are ignored.

    Returns:
      (scalar loss, metrics of scalars: per-feature losses and accuracies, positions).
    """
    cfg = self.cfg
    states = self(batch, deterministic=deterministic)                    # [B, E, D]
    mask = jnp.asarray(batch[T.MASK], bool)
    if T.EXAMPLE_MASK in batch:
      mask = mask & jnp.asarray(batch[T.EXAMPLE_MASK], bool)[:, None]
    if cfg.item_loss_chunk:
      item_loss, item_acc, positions = losses.chunked_softmax_cross_entropy(
          self.item_logits, states, batch[T.TARGETS_ITEM], mask, cfg.item_loss_chunk)
    else:
      item_loss, item_acc, positions = losses.softmax_cross_entropy(
          self.item_logits(states), batch[T.TARGETS_ITEM], mask)
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
    return losses.mask_reserved(self.item_logits(last_state), -jnp.inf)
