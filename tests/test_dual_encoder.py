"""Dual-encoder baseline: in-batch softmax with duplicates, learning, full-catalogue eval, job."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax.baselines import dual_encoder as dual_lib
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder.config import ENCODER_TINY
from user_llm_jax.eval import retrieval

NUM_ITEMS = 20  # ids 2..19 are real items
E = 6
C = 3


def _categories() -> np.ndarray:
  """Item i has category 2 + i % 4 (and PAD rows for the reserved ids)."""
  table = np.zeros((NUM_ITEMS, C), np.int32)
  table[schema.FIRST_ID:, 0] = schema.FIRST_ID + np.arange(NUM_ITEMS - schema.FIRST_ID) % 4
  return table


def _model(seed=0, **changes) -> dual_lib.DualEncoder:
  enc = ENCODER_TINY.replace(num_items=NUM_ITEMS, num_categories=8, max_len=E,
                             max_categories=C, num_layers=1, width=32, dropout=0.0)
  cfg = dual_lib.DualEncoderConfig(output_dim=16, item_dim=16, category_dim=8,
                                   item_hidden=32, **changes)
  with nnx.use_eager_sharding(False):
    return dual_lib.DualEncoder(cfg, enc, _categories(), rngs=nnx.Rngs(seed))


def _batch(b: int, seed: int = 0, lengths=None) -> dict[str, np.ndarray]:
  """Learnable timelines: each next item is the previous item + 1 (cycling in 2..19)."""
  rng = np.random.default_rng(seed)
  n = NUM_ITEMS - schema.FIRST_ID
  start = rng.integers(0, n, b)
  seq = schema.FIRST_ID + (start[:, None] + np.arange(E + 1)[None]) % n  # [B,E+1]
  lengths = np.full(b, E) if lengths is None else np.asarray(lengths)
  mask = np.arange(E)[None] < lengths[:, None]
  inputs = np.where(mask, seq[:, :-1], 0).astype(np.int32)
  targets = np.where(mask, seq[:, 1:], 0).astype(np.int32)
  cats = _categories()
  return {T.INPUTS_ITEM: inputs, T.INPUTS_RATING: np.where(mask, 2, 0).astype(np.int32),
          T.INPUTS_CATEGORY: cats[inputs], T.INPUTS_TIME: np.where(mask, 3, 0).astype(np.int32),
          T.TARGETS_ITEM: targets, T.MASK: mask, T.LAST_INDEX: (lengths - 1).astype(np.int32),
          T.EXAMPLE_MASK: np.ones(b, bool)}


def _manual_loss(q, k, items, valid, temperature):
  """Reference: each query's softmax over the distinct other items plus its own column."""
  losses = []
  for i in np.flatnonzero(valid):
    cols = [j for j in np.flatnonzero(valid) if j == i or items[j] != items[i]]
    logits = np.array([q[i] @ k[j] for j in cols]) / temperature
    own = cols.index(i)
    losses.append(-(logits[own] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()))
  return float(np.mean(losses))


def test_in_batch_duplicates_are_masked_not_negatives():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(5, 4)).astype(np.float32)
  k = rng.normal(size=(5, 4)).astype(np.float32)
  items = np.array([7, 7, 9, 7, 11])
  valid = np.array([True, True, True, True, False])
  loss, metrics = dual_lib.in_batch_softmax_loss(jnp.asarray(q), jnp.asarray(k),
                                                 jnp.asarray(items), jnp.asarray(valid), 0.5)
  np.testing.assert_allclose(float(loss), _manual_loss(q, k, items, valid, 0.5), rtol=1e-5)
  # Queries 0, 1, 3 share item 7 (2 masked copies each); query 2 has none: (2+2+0+2)/4.
  assert float(metrics["masked_duplicates"]) == pytest.approx(1.5)
  assert float(metrics["queries"]) == 4

  # The key of a duplicate copy gets no gradient from the other copies' queries: only
  # query 3's own column reads key 3, so its gradient equals that of a lone query.
  def loss_of(keys, valid_rows):
    return dual_lib.in_batch_softmax_loss(jnp.asarray(q), keys, jnp.asarray(items),
                                          jnp.asarray(valid_rows), 0.5)[0]
  grad = jax.grad(loss_of)(jnp.asarray(k), valid)
  assert np.all(np.asarray(grad[4]) == 0)  # an invalid column is never read
  # Changing a duplicate copy's key must not change query 0's loss term through column 3:
  # move key 3 and check the loss changes only through query 3's own (diagonal) term.
  moved = k.copy()
  moved[3] += 3.0
  delta = float(loss_of(jnp.asarray(moved), valid) - loss_of(jnp.asarray(k), valid))
  expected = (_manual_loss(q, moved, items, valid, 0.5) - _manual_loss(q, k, items, valid, 0.5))
  assert delta == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_logq_correction_subtracts_log_counts():
  q = jnp.eye(3, dtype=jnp.float32)
  k = jnp.eye(3, dtype=jnp.float32)
  items = jnp.asarray([4, 4, 5])
  valid = jnp.ones(3, bool)
  plain, _ = dual_lib.in_batch_softmax_loss(q, k, items, valid, 1.0)
  corrected, _ = dual_lib.in_batch_softmax_loss(q, k, items, valid, 1.0, logq_correction=True)
  # Query 2 (item 5) sees columns 0 and 1 (item 4, count 2) with logits 0 - log 2 each.
  l2 = -(1.0 - np.log(np.exp(1.0) + 2 * np.exp(-np.log(2.0))))
  l0 = -((1.0 - np.log(2)) - np.log(np.exp(1.0 - np.log(2)) + np.exp(0.0)))
  assert float(corrected) == pytest.approx((2 * l0 + l2) / 3, rel=1e-5)
  assert float(corrected) != pytest.approx(float(plain))


def test_empty_batch_gives_zero_loss_and_finite_grads():
  model = _model()
  batch = _batch(4)
  batch[T.EXAMPLE_MASK] = np.zeros(4, bool)
  loss, grads = nnx.jit(nnx.value_and_grad(lambda m: m.loss(batch)[0]))(model)
  assert float(loss) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_loss_decreases_on_learnable_fixture(positions):
  model = _model(train_positions=positions)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  batches = [_batch(16, seed=s, lengths=np.random.default_rng(s).integers(2, E + 1, 16))
             for s in range(4)]

  @nnx.jit
  def step(model, opt, batch):
    (loss, metrics), grads = nnx.value_and_grad(
        lambda m: m.loss(batch, deterministic=False), has_aux=True)(model)
    opt.update(model, grads)
    return loss, metrics

  losses = [float(step(model, opt, batches[i % 4])[0]) for i in range(60)]
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses[::10]
  # The item table of categories is a fixed feature, never updated.
  np.testing.assert_array_equal(np.asarray(model.item_tower.categories[...]), _categories())


def test_item_scores_rank_the_whole_catalogue():
  model = _model(seed=3)
  item_scores = nnx.jit(lambda m, b: m.item_scores(b))
  batch = _batch(5, seed=2, lengths=[6, 3, 1, 4, 2])
  scores = np.asarray(item_scores(model, batch))
  assert scores.shape == (5, NUM_ITEMS)
  assert np.all(np.isneginf(scores[:, :schema.FIRST_ID]))
  assert np.all(np.isfinite(scores[:, schema.FIRST_ID:]))
  # The user is read at last_index: history after it must not matter.
  other = {k: v.copy() for k, v in batch.items()}
  other[T.INPUTS_ITEM][1, 3:] = 9
  np.testing.assert_allclose(np.asarray(item_scores(model, other))[1], scores[1], rtol=1e-6)

  metrics = retrieval.evaluate_next_item(model, [batch, _batch(3, seed=5)])
  assert metrics["num_examples"] == 8
  targets = np.concatenate([retrieval.last_targets(batch), retrieval.last_targets(_batch(3, 5))])
  all_scores = np.concatenate([scores, np.asarray(item_scores(model, _batch(3, seed=5)))])
  ranks = [int(np.sum(s > s[t]) + np.sum((s == s[t])[:t])) for s, t in zip(all_scores, targets)]
  assert metrics["recall@10"] == pytest.approx(np.mean(np.asarray(ranks) < 10))
  assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="train_positions"):
    dual_lib.DualEncoderConfig(train_positions="first")
  with pytest.raises(ValueError, match="temperature"):
    dual_lib.DualEncoderConfig(temperature=0.0)
  with pytest.raises(ValueError, match="num_items"):
    dual_lib.ItemTower(dual_lib.DualEncoderConfig(), 30, 8, _categories(), rngs=nnx.Rngs(0))


def test_job_trains_and_reports_recall(tmp_path):
  from experiments.configs import dual_encoder_movielens
  from user_llm_jax import jobs

  config = dual_encoder_movielens.get_config("smoke")
  config.data.synthetic.num_users = 80
  config.data.synthetic.num_items = 60
  config.data.synthetic.events_per_user_mean = 25.0
  config.data.window = 10
  config.train.num_steps = 12
  config.train.checkpoint_every = 12
  config.train.log_every = 4
  summary = jobs.resolve(config.job)(config, str(tmp_path))
  with open(os.path.join(tmp_path, "summary.json"), encoding="utf-8") as f:
    on_disk = json.load(f)
  for key in ("recall@1", "recall@5", "recall@10", "ndcg@10", "popularity/recall@10"):
    assert 0.0 <= on_disk["metrics"][key] <= 1.0, key
  assert on_disk["metrics"]["num_examples"] == summary["metrics"]["num_examples"] > 0
  assert on_disk["steps"] == 12
  assert os.path.exists(os.path.join(tmp_path, "summary.txt"))
