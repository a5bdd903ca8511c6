"""The encoder's learned repeat bias (`EncoderConfig.repeat_bias`) and the context check's
control that ranks with the model's input-window items excluded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.test_encoder import pattern_records, to_batch
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.encoder import losses
from user_llm_jax.encoder import model as encoder_model

CFG = ENCODER_TINY.replace(rating_loss_weight=0.0, category_loss_weight=0.0)
REPEAT = CFG.replace(repeat_bias=True)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
  return to_batch(pattern_records(6, CFG, seed=3), CFG)


def brute_window_items(items, mask, num_items):
  """Loop form of `window_items`: position e holds every real item of valid events 0..e."""
  b, e = items.shape
  out = np.zeros((b, e, num_items), bool)
  for i in range(b):
    for p in range(e):
      for q in range(p + 1):
        if mask[i, q] and schema.FIRST_ID <= items[i, q] < num_items:
          out[i, p, items[i, q]] = True
  return out


def test_window_items_and_target_in_window_match_loops():
  rng = np.random.default_rng(0)
  items = rng.integers(0, 9, (4, 7))          # PAD (0), OOV (1) and real ids, repeats
  mask = rng.random((4, 7)) < 0.8
  targets = rng.integers(0, 9, (4, 7))
  want = brute_window_items(items, mask, 9)
  got = np.asarray(encoder_model.window_items(jnp.asarray(items), jnp.asarray(mask), 9))
  np.testing.assert_array_equal(got, want)
  in_window = np.asarray(encoder_model.target_in_window(
      jnp.asarray(items), jnp.asarray(mask), jnp.asarray(targets)))
  gathered = np.take_along_axis(want, targets[..., None], -1)[..., 0]
  np.testing.assert_array_equal(in_window, gathered & (targets >= schema.FIRST_ID))
  assert in_window.any() and not in_window.all()   # the case exercises both outcomes


def test_read_items_are_the_events_up_to_last_index(batch):
  read = np.asarray(encoder_model.read_items(batch, CFG.num_items))
  for i in range(len(read)):
    last = int(batch[T.LAST_INDEX][i])
    want = {int(x) for x, m in zip(batch[T.INPUTS_ITEM][i][:last + 1],
                                   batch[T.MASK][i][:last + 1]) if m and x >= 2}
    assert set(np.flatnonzero(read[i]).tolist()) == want


def test_other_parameters_equal_a_model_without_it_and_scores_move_only_on_read_items(batch):
  plain = UserEncoder(CFG, rngs=nnx.Rngs(0))
  model = UserEncoder(REPEAT, rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  other = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  assert set(flat) - set(other) == {("repeat_bias",)}
  for key, value in other.items():
    np.testing.assert_array_equal(np.asarray(flat[key][...]), np.asarray(value[...]))
  # At 0 (its initial value) it changes nothing; at -5 only the read items move, by -5.
  np.testing.assert_array_equal(np.asarray(model.next_item_logits(batch)),
                                np.asarray(plain.next_item_logits(batch)))
  model.repeat_bias[...] = jnp.asarray(-5.0)
  shifted = np.asarray(model.next_item_logits(batch))
  base = np.asarray(plain.next_item_logits(batch))
  read = np.asarray(encoder_model.read_items(batch, CFG.num_items))
  real = np.isfinite(base)
  np.testing.assert_allclose(shifted[real] - base[real], np.where(read, -5.0, 0.0)[real],
                             atol=1e-5)


def test_loss_is_the_softmax_over_logits_with_the_bias_at_read_items(batch):
  model = UserEncoder(REPEAT, rngs=nnx.Rngs(1))
  model.repeat_bias[...] = jnp.asarray(-2.0)
  loss, metrics = model.pretrain_loss(batch, deterministic=True)
  states = model(batch, deterministic=True)
  window = encoder_model.window_items(batch[T.INPUTS_ITEM], jnp.asarray(batch[T.MASK], bool),
                                      CFG.num_items)
  logits = losses.mask_reserved(model.item_logits(states) + jnp.where(window, -2.0, 0.0))
  targets = jnp.asarray(batch[T.TARGETS_ITEM], jnp.int32)
  weights = losses.target_weights(targets, jnp.asarray(batch[T.MASK], bool))
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(weights > 0, targets, schema.FIRST_ID))
  want = float(jnp.sum(nll * weights) / jnp.sum(weights))
  assert float(metrics["item_loss"]) == pytest.approx(want, rel=1e-5)
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_training_learns_a_negative_bias_when_targets_never_repeat_the_window():
  # The pattern users walk the catalogue without returning within a window: every read
  # item is a wrong answer, so the gradient pushes the bias down.
  records = pattern_records(16, CFG, seed=5)
  batch = to_batch(records, CFG)
  window = encoder_model.window_items(batch[T.INPUTS_ITEM], jnp.asarray(batch[T.MASK], bool),
                                      CFG.num_items)
  hits = encoder_model.target_in_window(batch[T.INPUTS_ITEM], jnp.asarray(batch[T.MASK], bool),
                                        jnp.asarray(batch[T.TARGETS_ITEM]))
  assert bool(window.any()) and not bool((hits & jnp.asarray(batch[T.MASK], bool)).any())
  model = UserEncoder(REPEAT, rngs=nnx.Rngs(2))
  grads = nnx.grad(lambda m: m.pretrain_loss(batch, deterministic=True)[0])(model)
  assert float(grads.repeat_bias[...]) > 0            # descent lowers it


def test_the_bias_is_refused_where_it_is_not_implemented():
  with pytest.raises(ValueError, match="repeat_bias=True: supported with the unchunked"):
    CFG.replace(repeat_bias=True, item_loss="gbce")
  with pytest.raises(ValueError, match="item_loss_chunk=4"):
    CFG.replace(repeat_bias=True, item_loss_chunk=4)


def test_window_control_scores_are_the_logits_without_the_read_items(batch):
  from user_llm_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  model = UserEncoder(CFG, rngs=nnx.Rngs(4))
  graphdef, state = nnx.split(model)
  got = np.asarray(ranking._window_excluded_scores(graphdef, state, batch))  # pylint: disable=protected-access
  logits = np.asarray(model.next_item_logits(batch))
  read = np.asarray(encoder_model.read_items(batch, CFG.num_items))
  assert read.any()
  assert np.all(np.isneginf(got[read]))
  np.testing.assert_array_equal(got[~read], logits[~read])
