"""Per-event feature embeddings and the two ways of fusing them (early / late).

Early fusion (the paper's default): each event's feature embeddings are concatenated and
projected to the model width, then one causal transformer reads the fused events.
Late fusion: each feature gets its own causal transformer; their per-event outputs are
concatenated and projected to the width after encoding.

Axis letters: B batch, E events, C category slots, F feature_dim, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.encoder.transformer import CausalTransformer, dense
from user_llm_jax.sharding import partitioned


def _embed(num: int, cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(
      num, cfg.feature_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
      rngs=rngs)


class FeatureEmbeddings(nnx.Module):
  """One embedding table per event feature.

  Categories are a multi-hot bag: one gather of the [B, E, C] ids and a masked mean over
  the non-PAD slots. Padded event positions get all-zero embeddings, so whatever ids sit
  in the padding cannot reach any output.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.item = _embed(cfg.num_items, cfg, rngs)
    self.rating = _embed(cfg.num_ratings, cfg, rngs) if cfg.use_rating else None
    self.category = _embed(cfg.num_categories, cfg, rngs) if cfg.use_categories else None
    self.time = _embed(cfg.num_time_buckets, cfg, rngs) if cfg.use_time else None
    self.dtype = cfg.dtype

  def __call__(self, batch: dict[str, jax.Array]) -> list[jax.Array]:
    """Returns the per-feature embeddings, each [B, E, F], in a fixed order (item,
    rating, categories, time; the unused ones left out)."""
    keep = batch[T.MASK][..., None].astype(self.dtype)                  # [B, E, 1]
    features = [self.item(batch[T.INPUTS_ITEM])]
    if self.rating is not None:
      features.append(self.rating(batch[T.INPUTS_RATING]))
    if self.category is not None:
      cats = batch[T.INPUTS_CATEGORY]                                    # [B, E, C]
      cat_valid = (cats != schema.PAD_ID).astype(self.dtype)[..., None]  # [B, E, C, 1]
      cat_sum = jnp.sum(self.category(cats) * cat_valid, axis=-2)        # [B, E, F]
      features.append(cat_sum / jnp.maximum(jnp.sum(cat_valid, axis=-2), 1.0))
    if self.time is not None:
      features.append(self.time(batch[T.INPUTS_TIME]))
    return [f * keep for f in features]

  def attend_items(self, query: jax.Array) -> jax.Array:
    """Scores `query` [..., F] against every item embedding -> [..., num_items]."""
    return self.item.attend(query)


class EarlyFusion(nnx.Module):
  """Concatenate per-event features, project to D, then one causal transformer."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.project = dense(cfg.num_features * cfg.feature_dim, cfg.width, "features", "embed",
                         cfg, rngs=rngs)
    self.encoder = CausalTransformer(cfg, cfg.num_layers, rngs=rngs)

  def __call__(self, features: list[jax.Array], mask: jax.Array, *,
               deterministic: bool) -> jax.Array:
    fused = self.project(jnp.concatenate(features, axis=-1))  # [B, E, nF] -> [B, E, D]
    return self.encoder(fused, mask, deterministic=deterministic)


class LateFusion(nnx.Module):
  """One causal transformer per feature; per-event outputs concatenated, projected to D."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.inputs = nnx.List([
        dense(cfg.feature_dim, cfg.width, "features", "embed", cfg, rngs=rngs)
        for _ in range(cfg.num_features)])
    self.encoders = nnx.List([
        CausalTransformer(cfg, cfg.feature_layers, rngs=rngs)
        for _ in range(cfg.num_features)])
    self.project = dense(cfg.num_features * cfg.width, cfg.width, "features", "embed", cfg,
                         rngs=rngs)

  def __call__(self, features: list[jax.Array], mask: jax.Array, *,
               deterministic: bool) -> jax.Array:
    outputs = [encoder(proj(f), mask, deterministic=deterministic)     # [B, E, D] each
               for f, proj, encoder in zip(features, self.inputs, self.encoders)]
    return self.project(jnp.concatenate(outputs, axis=-1))             # [B, E, nD] -> [B, E, D]
