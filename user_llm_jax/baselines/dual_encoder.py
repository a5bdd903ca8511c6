"""Dual-encoder next-item baseline: user tower vs item tower, in-batch softmax.

  user tower   UserEncoder over the history [B,E] -> states [B,E,D] -> linear -> u [B,E,O]
  item tower   item id embedding [F_i] ++ mean of its category embeddings [F_c]
               -> MLP -> v [O]
  score        <u, v> / temperature   (u, v L2-normalised when `normalize`)

Training (`loss`): every valid history position t is a query whose positive is the next
event's item `targets_item[b, t]` (`train_positions='all'`, as SASRec trains), or only the
record's last position (`'last'`). The negatives are the positives of the other queries in
the batch (in-batch softmax over the N = #queries columns).

In-batch duplicates: popular items appear as the positive of several queries of a batch.
A column whose item equals the query's own positive is *masked* (except the query's own
column), so the model is never pushed away from the right item just because another query
shares it; every query thus sees each distinct item at most once. (The popularity bias of
in-batch negatives -- frequent items are sampled as negatives more often -- is left
uncorrected by default; `logq_correction` subtracts log of the item's in-batch count,
the usual sampled-softmax correction estimated from the batch itself.)

Evaluation (`item_scores`): the item tower embeds the whole catalogue and every test user is
scored against every item (full-catalogue ranking, PAD/OOV columns -inf), so the metrics of
`eval.retrieval` apply unchanged.

Axis letters: B batch, E events, N queries, O output width, V items, C categories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import losses
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.sharding import partitioned

TRAIN_POSITIONS = ("all", "last")
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """The dual encoder's own hyper-parameters (the user tower is an `EncoderConfig`).

  Attributes:
    output_dim: O, width of the shared user/item space.
    item_dim: width of the item tower's id embedding.
    category_dim: width of the item tower's category embedding.
    item_hidden: hidden width of the item tower MLP.
    normalize: L2-normalise both towers' outputs (cosine similarity).
    temperature: the softmax temperature of the scores.
    train_positions: 'all' valid positions are queries, or only the 'last' one.
    logq_correction: subtract log(in-batch count) of each column's item from its logit.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters.
  """

  output_dim: int = 64
  item_dim: int = 64
  category_dim: int = 32
  item_hidden: int = 128
  normalize: bool = True
  temperature: float = 0.05
  train_positions: str = "all"
  logq_correction: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("output_dim", "item_dim", "category_dim", "item_hidden"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"DualEncoderConfig.{name}={value!r}: must be a positive int")
    if not self.temperature > 0:
      raise ValueError(f"DualEncoderConfig.temperature={self.temperature}: must be > 0")
    if self.train_positions not in TRAIN_POSITIONS:
      raise ValueError(f"DualEncoderConfig.train_positions={self.train_positions!r}: "
                       f"must be one of {TRAIN_POSITIONS}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"DualEncoderConfig.{name}={getattr(self, name)!r} is not a "
                         "dtype") from e


class ItemFeatures(nnx.Variable):
  """Fixed per-item side features (not trained, not a `Param`)."""


def item_category_table(vocab: schema.Vocabulary, max_categories: int) -> np.ndarray:
  """int32[num_items, C] category ids of every catalogue item, PAD-padded.

  Reserved items (PAD, OOV) and items without categories get an all-PAD row.
  """
  table = np.full((vocab.num_items, max_categories), schema.PAD_ID, np.int32)
  for i, item in enumerate(vocab.items):
    if i >= schema.FIRST_ID:
      cats = list(item.category_ids)[:max_categories]
      table[i, :len(cats)] = cats
  return table


def _linear(in_dim: int, out_dim: int, in_axis: str, out_axis: str, cfg: DualEncoderConfig,
            *, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      in_dim, out_dim, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=partitioned(nnx.initializers.lecun_normal(), (in_axis, out_axis)),
      bias_init=partitioned(nnx.initializers.zeros_init(), (out_axis,)), rngs=rngs)


def _embed(num: int, dim: int, cfg: DualEncoderConfig, *, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, dim, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                   embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "features")),
                   rngs=rngs)


class ItemTower(nnx.Module):
  """Item id + category features -> MLP -> [.., O]."""

  def __init__(self, cfg: DualEncoderConfig, num_items: int, num_categories: int,
               categories: np.ndarray, *, rngs: nnx.Rngs):
    if categories.shape[0] != num_items:
      raise ValueError(f"item category table has {categories.shape[0]} rows, expected "
                       f"num_items={num_items}")
    self.categories = ItemFeatures(jnp.asarray(categories, jnp.int32))  # [V,C]
    self.item = _embed(num_items, cfg.item_dim, cfg, rngs=rngs)
    self.category = _embed(num_categories, cfg.category_dim, cfg, rngs=rngs)
    self.hidden = _linear(cfg.item_dim + cfg.category_dim, cfg.item_hidden, "features", "mlp",
                          cfg, rngs=rngs)
    self.out = _linear(cfg.item_hidden, cfg.output_dim, "mlp", "features", cfg, rngs=rngs)

  def __call__(self, items: jax.Array) -> jax.Array:
    """int ids [...] -> item embeddings [..., O]."""
    cats = self.categories[...][items]                                  # [...,C]
    valid = (cats != schema.PAD_ID)[..., None]                         # [...,C,1]
    bag = jnp.sum(self.category(cats) * valid, axis=-2)                # [...,F_c]
    bag = bag / jnp.maximum(valid.sum(axis=-2), 1)                     # mean over the set
    x = jnp.concatenate([self.item(items), bag.astype(self.item.dtype)], axis=-1)
    return self.out(jax.nn.gelu(self.hidden(x)))


class DualEncoder(nnx.Module):
  """User tower (UserEncoder + projection) and item tower sharing an O-dim space."""

  def __init__(self, cfg: DualEncoderConfig, encoder_cfg: EncoderConfig,
               item_categories: np.ndarray, *, rngs: nnx.Rngs):
    """Args:
      cfg: dual-encoder settings.
      encoder_cfg: the user tower's architecture (its next-event heads are unused).
      item_categories: int[num_items, C] (`item_category_table`).
      rngs: `params` (and `dropout` for the user tower) streams.
    """
    self.cfg = cfg
    self.user_tower = UserEncoder(encoder_cfg, rngs=rngs)
    self.user_proj = _linear(encoder_cfg.width, cfg.output_dim, "embed", "features", cfg,
                             rngs=rngs)
    self.item_tower = ItemTower(cfg, encoder_cfg.num_items, encoder_cfg.num_categories,
                                np.asarray(item_categories), rngs=rngs)

  def _finish(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.cfg.normalize:
      x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    return x

  def user_embeddings(self, batch: Batch, *, deterministic: bool = True) -> jax.Array:
    """[B,E,O] user-tower outputs at every history position."""
    return self._finish(self.user_proj(self.user_tower(batch, deterministic=deterministic)))

  def item_embeddings(self, items: jax.Array) -> jax.Array:
    """int ids [...] -> [..., O] item-tower outputs."""
    return self._finish(self.item_tower(items))

  def item_scores(self, batch: Batch) -> jax.Array:
    """Scores of every catalogue item for each record's target: float32 [B, V].

    The user is read at `last_index`; PAD and OOV columns are -inf.
    """
    users = self.user_embeddings(batch)                                  # [B,E,O]
    last = jnp.asarray(batch[T.LAST_INDEX], jnp.int32)
    user = jnp.take_along_axis(users, last[:, None, None], axis=1)[:, 0]  # [B,O]
    items = self.item_embeddings(jnp.arange(self.item_tower.item.num_embeddings))  # [V,O]
    scores = jnp.einsum("BO,VO->BV", user, items) / self.cfg.temperature
    return losses.mask_reserved(scores, -jnp.inf)

  next_item_logits = item_scores  # `eval.retrieval.evaluate_next_item` reads this name

  def loss(self, batch: Batch, *,
           deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """In-batch softmax cross-entropy (see the module docstring), averaged over queries.

    Returns:
      (loss, metrics): `in_batch_accuracy` (the positive scores highest among the
      unmasked columns), `queries` (count) and `masked_duplicates` (masked columns per
      query, averaged).
    """
    users = self.user_embeddings(batch, deterministic=deterministic)     # [B,E,O]
    b, e, o = users.shape
    targets = jnp.asarray(batch[T.TARGETS_ITEM], jnp.int32)               # [B,E]
    valid = jnp.asarray(batch[T.MASK], bool) & (targets >= schema.FIRST_ID)
    if self.cfg.train_positions == "last":
      last = jnp.asarray(batch[T.LAST_INDEX], jnp.int32)
      valid = valid & (jnp.arange(e)[None, :] == last[:, None])
    if T.EXAMPLE_MASK in batch:
      valid = valid & jnp.asarray(batch[T.EXAMPLE_MASK], bool)[:, None]
    queries = users.reshape(b * e, o)                                     # [N,O]
    items = targets.reshape(b * e)                                        # [N]
    valid = valid.reshape(b * e)                                          # [N]
    keys = self.item_embeddings(items)                                    # [N,O]
    return in_batch_softmax_loss(queries, keys, items, valid, self.cfg.temperature,
                                 logq_correction=self.cfg.logq_correction)


def in_batch_softmax_loss(queries: jax.Array, keys: jax.Array, items: jax.Array,
                          valid: jax.Array, temperature: float, *,
                          logq_correction: bool = False,
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax over in-batch positives with duplicate items masked.

  Args:
    queries: [N,O] user embeddings.
    keys: [N,O] item embeddings of each query's positive.
    items: int[N] the positives' item ids (duplicates allowed).
    valid: bool[N] real queries (invalid ones are neither queries nor columns).
    temperature: logits are dot products / temperature.
    logq_correction: subtract log(#occurrences of the column's item among valid columns).

  Returns:
    (mean loss over valid queries -- 0 with zero gradients when there are none --, metrics).
  """
  n = items.shape[0]
  logits = jnp.einsum("NO,MO->NM", queries, keys).astype(jnp.float32) / temperature  # [N,N]
  same = items[:, None] == items[None, :]                                 # [N,N]
  own = jnp.eye(n, dtype=bool)
  # Columns kept for query i: valid ones, minus other copies of i's own positive.
  keep = valid[None, :] & (~same | own)
  if logq_correction:
    counts = jnp.sum(same & valid[None, :], axis=1).astype(jnp.float32)   # [N]
    logits = logits - jnp.log(jnp.maximum(counts, 1.0))[None, :]
  logits = jnp.where(keep, logits, -1e9)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.diagonal(log_probs)                                          # [N]
  weights = valid.astype(jnp.float32)
  count = weights.sum()
  loss = jnp.sum(nll * weights) / jnp.maximum(count, 1.0)
  hit = jnp.argmax(logits, axis=-1) == jnp.arange(n)
  dup = jnp.sum(valid[None, :] & same & ~own, axis=1).astype(jnp.float32)
  metrics = {"in_batch_accuracy": jnp.sum(hit * weights) / jnp.maximum(count, 1.0),
             "queries": count,
             "masked_duplicates": jnp.sum(dup * weights) / jnp.maximum(count, 1.0)}
  return loss, metrics
