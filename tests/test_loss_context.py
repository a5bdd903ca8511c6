"""Encoder training options: positions with enough context (`loss_min_context`), Post-LN."""

import jax
import numpy as np
import pytest
from flax import nnx

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.data import windows
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.encoder import losses

CFG = ENCODER_TINY  # window 8, 40 items


def record(n: int, user: bytes = b"u") -> dict:
  items = 2 + np.arange(n) % 30
  return {schema.USER_ID: user, schema.ITEM_IDS: items.astype(np.int32),
          schema.RATINGS: (2 + items % 4).astype(np.int32),
          schema.TIMESTAMPS: (np.arange(n) * 600).astype(np.int64),
          schema.CATEGORY_IDS: (2 + items % 5).astype(np.int32),
          schema.CATEGORY_LENGTHS: np.ones(n, np.int32), schema.FAVORITE_CATEGORY: 2}


def test_full_context_mask():
  mask = np.asarray(losses.full_context_mask(np.array([0, 3]), 5, 4))
  np.testing.assert_array_equal(mask, [[True] * 5, [False, False, False, True, True]])


def test_windows_tell_each_example_where_its_inputs_start():
  long, short = record(40, b"long"), record(5, b"short")
  ds = windows.RandomWindows([short, long], window=CFG.max_len, seed=0, passes=20)
  crop = T.CropAndPad(CFG.max_len, CFG.max_categories)
  offsets = set()
  for i in range(len(ds)):
    w = ds[i]
    ex = crop.map(w)
    if w[schema.USER_ID] == b"short":
      assert ex[T.CONTEXT_OFFSET] == 0
      continue
    # The first input is event `offset` of the user's history (timestamps are 600 * index).
    first = int(np.asarray(w[schema.TIMESTAMPS])[-(CFG.max_len + 1)]) // 600
    assert ex[T.CONTEXT_OFFSET] == first
    offsets.add(int(ex[T.CONTEXT_OFFSET]))
  assert 0 in offsets and max(offsets) == 40 - (CFG.max_len + 1)
  # Records that are not windows (evaluation, the last-window view) get no offset.
  assert T.CONTEXT_OFFSET not in crop.map(long)


def batch_of(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_min_context_trains_only_positions_with_enough_context():
  crop = T.CropAndPad(CFG.max_len, CFG.max_categories)
  long = windows.slice_events(record(20), 5, 15)  # 10 events: the one before + a window
  examples = [crop.map({**long, schema.WINDOW_START: 5}),       # offset 6: mid-history
              crop.map({**record(6), schema.WINDOW_START: 0})]  # whole history, 5 inputs
  assert [int(e[T.CONTEXT_OFFSET]) for e in examples] == [6, 0]
  batch = batch_of(examples)
  counts = {}
  for k in (0, 1, 6, CFG.max_len):
    model = UserEncoder(CFG.replace(loss_min_context=k), rngs=nnx.Rngs(0))
    _, metrics = model.pretrain_loss(batch, deterministic=False)
    counts[k] = int(metrics["positions"])
    # Evaluation losses score every position.
    _, eval_metrics = model.pretrain_loss(batch, deterministic=True)
    assert int(eval_metrics["positions"]) == 8 + 5
  # The mid-history window keeps positions e + 1 >= k; the whole-history one all 5.
  assert counts == {0: 13, 1: 13, 6: 3 + 5, CFG.max_len: 1 + 5}


def test_min_context_needs_the_offset_and_a_valid_value():
  model = UserEncoder(CFG.replace(loss_min_context=4), rngs=nnx.Rngs(0))
  plain = batch_of([T.CropAndPad(CFG.max_len, CFG.max_categories).map(record(12))])
  with pytest.raises(KeyError, match="context_offset"):
    model.pretrain_loss(plain, deterministic=False)
  for bad in (-1, CFG.max_len + 1, True):
    with pytest.raises(ValueError, match="loss_min_context"):
      CFG.replace(loss_min_context=bad)


def test_post_norm_blocks_normalise_their_output():
  cfg = CFG.replace(norm_position="post", dropout=0.0)
  model = UserEncoder(cfg, rngs=nnx.Rngs(0))
  batch = batch_of([T.CropAndPad(CFG.max_len, CFG.max_categories).map(record(n))
                    for n in (4, 12)])
  states = np.asarray(model(batch))
  mask = batch[T.MASK]
  # The last block's LayerNorm (scale 1, bias 0 at init) ends the encoder: every valid
  # state has mean 0 and variance 1 over the width, and no final LayerNorm is applied.
  valid = states[mask]
  np.testing.assert_allclose(valid.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(valid.var(-1), 1.0, atol=1e-3)
  model.final_norm.scale[...] = model.final_norm.scale[...] * 3.0
  np.testing.assert_allclose(np.asarray(model(batch)), states, atol=1e-6)
  # Pre-LN (default) reads the final LayerNorm, and draws the same parameters.
  pre = UserEncoder(CFG.replace(dropout=0.0), rngs=nnx.Rngs(0))
  same = jax.tree.map(np.array_equal, nnx.state(pre, nnx.Param), nnx.state(
      UserEncoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  assert all(jax.tree.leaves(same))
  assert not np.allclose(np.asarray(pre(batch))[mask], valid, atol=1e-3)
  with pytest.raises(ValueError, match="norm_position"):
    CFG.replace(norm_position="middle")


def test_attention_dropout_only_in_training():
  batch = batch_of([T.CropAndPad(CFG.max_len, CFG.max_categories).map(record(n))
                    for n in (4, 12)])
  mask = batch[T.MASK]
  plain = UserEncoder(CFG.replace(dropout=0.0), rngs=nnx.Rngs(0))
  dropped = UserEncoder(CFG.replace(dropout=0.0, attention_dropout=0.5), rngs=nnx.Rngs(0))
  # The same parameters; evaluation (deterministic) gives the same states.
  np.testing.assert_allclose(np.asarray(dropped(batch)), np.asarray(plain(batch)), atol=1e-6)
  train = np.asarray(dropped(batch, deterministic=False))
  assert np.all(np.isfinite(train))
  assert not np.allclose(train[mask], np.asarray(plain(batch))[mask], atol=1e-3)
  # Without attention dropout (and dropout 0) training states are the evaluation states.
  np.testing.assert_allclose(np.asarray(plain(batch, deterministic=False)),
                             np.asarray(plain(batch)), atol=1e-6)
  # The causal mask holds under dropout: changing event 3 leaves positions < 3 unchanged.
  other = {k: v.copy() for k, v in batch.items()}
  other[T.INPUTS_ITEM][:, 3] = 5
  fresh = [UserEncoder(CFG.replace(dropout=0.0, attention_dropout=0.5), rngs=nnx.Rngs(0))
           for _ in range(2)]  # fresh models: the same dropout draws
  np.testing.assert_allclose(np.asarray(fresh[0](other, deterministic=False))[:, :3],
                             np.asarray(fresh[1](batch, deterministic=False))[:, :3],
                             atol=1e-5)
  with pytest.raises(ValueError, match="attention_dropout"):
    CFG.replace(attention_dropout=1.0)


def test_benchmark_arms_set_the_new_options():
  from experiments.benchmarks import encoder_quality
  for arm, key, value in (("recbole_split_min_context_40", "loss_min_context", 40),
                          ("recbole_split_post_ln", "norm_position", "post"),
                          ("recbole_split_post_ln_attn_dropout", "attention_dropout", 0.2)):
    config = encoder_quality.arm_config(arm, "ml-latest-small", "/x", exclude_seen=False,
                                        overrides={})
    assert config.encoder.model[key] == value
    assert config.data.timestamp_precision == "float32"
