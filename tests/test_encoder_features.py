"""Which event features the encoder reads (item only, + rating, + genres, + time) and a
dataset without categories."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.params import count_params

CFG = ENCODER_TINY.replace(max_len=6, max_categories=2)


def batch(cfg, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  b, e, c = 3, cfg.max_len, cfg.max_categories
  def ids(n, shape):
    return jnp.asarray(rng.integers(2, n, shape), jnp.int32)
  return {T.INPUTS_ITEM: ids(cfg.num_items, (b, e)), T.TARGETS_ITEM: ids(cfg.num_items, (b, e)),
          T.INPUTS_RATING: ids(cfg.num_ratings, (b, e)),
          T.TARGETS_RATING: ids(cfg.num_ratings, (b, e)),
          T.INPUTS_CATEGORY: jnp.zeros((b, e, c), jnp.int32),
          T.TARGETS_CATEGORY: jnp.zeros((b, e, c), jnp.int32),
          T.INPUTS_TIME: ids(T.NUM_TIME_BUCKETS, (b, e)), T.MASK: jnp.ones((b, e), bool),
          T.LAST_INDEX: jnp.full((b,), e - 1, jnp.int32)}


def test_item_only_reads_nothing_else():
  cfg = CFG.replace(use_rating=False, use_categories=False, use_time=False,
                    rating_loss_weight=0.0, category_loss_weight=0.0)
  assert cfg.num_features == 1
  model = UserEncoder(cfg, rngs=nnx.Rngs(0))
  assert model.features.rating is None and model.features.category is None
  assert count_params(model) < count_params(UserEncoder(CFG, rngs=nnx.Rngs(0)))
  x = batch(cfg)
  changed = dict(x, **{T.INPUTS_RATING: x[T.INPUTS_RATING][:, ::-1],
                       T.INPUTS_TIME: x[T.INPUTS_TIME][:, ::-1]})
  np.testing.assert_array_equal(model(x), model(changed))    # ratings and gaps unread
  loss, metrics = model.pretrain_loss(x, deterministic=True)
  assert np.isfinite(float(loss)) and float(metrics["rating_loss"]) == 0.0
  assert float(loss) == pytest.approx(float(metrics["item_loss"]))


def test_dataset_without_categories():
  # Only the reserved ids PAD and OOV: fine when categories are neither read nor predicted.
  cfg = CFG.replace(num_categories=2, use_categories=False, category_loss_weight=0.0)
  loss, metrics = UserEncoder(cfg, rngs=nnx.Rngs(0)).pretrain_loss(batch(cfg))
  assert np.isfinite(float(loss)) and float(metrics["category_loss"]) == 0.0
  with pytest.raises(ValueError, match="num_categories=2.*use_categories=False"):
    CFG.replace(num_categories=2)
