"""Sampled next-item losses of the user encoder: sampled softmax and gSASRec's gBCE."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import encoder_movielens
from tests.test_encoder import pattern_records, to_batch
from user_llm_jax import config as config_lib
from user_llm_jax import models
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.data import pipeline
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.encoder import losses
from user_llm_jax.train import train_step as train_step_lib

CFG = ENCODER_TINY  # 2 layers x width 32, window 8, 40 items (38 real)
GBCE = CFG.replace(item_loss="gbce", item_negatives=16)


def log_sigmoid(x):
  return -np.log1p(np.exp(-np.asarray(x, np.float64)))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
  return to_batch(pattern_records(6, CFG, seed=1), CFG)


# ----------------------------------------------------------------------------- config


def test_defaults_keep_the_full_softmax():
  assert (CFG.item_loss, CFG.item_negatives, CFG.gbce_t) == ("softmax", 256, 0.75)
  CFG.replace(item_negatives=0)  # unused by the full softmax: not an error
  CFG.replace(item_loss_chunk=8)


@pytest.mark.parametrize("kw,message", [
    ({"item_loss": "foo"}, r"item_loss='foo': must be one of"),
    ({"item_loss": "gbce", "item_negatives": 0}, r"item_negatives=0: must be an int >= 1"),
    ({"item_loss": "sampled_softmax", "item_negatives": 2.5}, r"item_negatives=2.5"),
    ({"item_loss": "gbce", "gbce_t": 1.5}, r"gbce_t=1.5: must be a number in \[0, 1\]"),
    ({"gbce_t": -0.1}, r"gbce_t=-0.1"),
    ({"item_loss": "gbce", "item_loss_chunk": 8}, r"item_loss_chunk=8: .*must be 0"),
    ({"item_loss": "gbce", "num_items": 3}, r"num_items=3: .*at least 2 real items"),
])
def test_invalid_values_name_the_field(kw, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**kw)


def test_runs_saved_before_the_keys_existed_still_match_their_fingerprint():
  config = encoder_movielens.get_config("smoke")
  arch = models.architecture(encoder=CFG)["encoder"]
  new_keys = ("item_loss", "item_negatives", "gbce_t", "item_bias", "negatives_per")
  assert all(k in config.encoder.model for k in new_keys)
  # A run saved before them has none of the keys, in its config or its architecture.
  saved = config_lib.fingerprint(
      config, encoder_architecture={k: v for k, v in arch.items() if k not in new_keys})
  saved["encoder"]["model"] = {k: v for k, v in saved["encoder"]["model"].items()
                               if k not in new_keys}
  now = config_lib.fingerprint(config, encoder_architecture=arch)
  assert config_lib.differing_keys(saved, now) == []
  config.encoder.model.item_loss = "gbce"
  changed = config_lib.fingerprint(
      config, encoder_architecture=dict(arch, item_loss="gbce"))
  assert config_lib.differing_keys(saved, changed) == [
      "encoder.model.item_loss", "encoder_architecture.item_loss"]


# --------------------------------------------------------------------- pure loss functions


def test_uniform_negatives_draw_only_real_items():
  ids = losses.uniform_negatives(jax.random.key(0), 4000, 7)
  assert ids.shape == (4000,) and ids.dtype == jnp.int32
  assert set(np.unique(ids).tolist()) == {2, 3, 4, 5, 6}


def test_sampled_softmax_hand_computed():
  positive = jnp.array([[2.0, 0.5]])                                      # [1, 2]
  negative = jnp.array([[[1.0, 0.0, -1.0], [0.5, 3.0, 0.0]]])             # [1, 2, 3]
  targets = jnp.array([[5, 7]])
  negatives = jnp.array([4, 7, 9])  # 7 is position 1's own target: excluded there
  loss, acc, n = losses.sampled_softmax_cross_entropy(
      positive, negative, targets, negatives, jnp.array([[True, True]]))
  nll0 = -np.log(np.exp(2) / (np.exp(2) + np.exp(1) + np.exp(0) + np.exp(-1)))
  nll1 = -np.log(np.exp(0.5) / (np.exp(0.5) + np.exp(0.5) + np.exp(0)))
  np.testing.assert_allclose(loss, (nll0 + nll1) / 2, rtol=1e-6)
  # Position 0 outscores every negative; position 1 only ties its best kept one.
  assert float(acc) == 0.5 and float(n) == 2.0


def test_gbce_beta_follows_the_paper():
  # alpha = K / (real items - 1) = 3 / 10; beta = alpha (t (1 - 1/alpha) + 1/alpha).
  np.testing.assert_allclose(losses.gbce_beta(3, 11, 0.75), 0.3 * (0.75 * (1 - 1 / 0.3)
                                                                  + 1 / 0.3))
  np.testing.assert_allclose(losses.gbce_beta(3, 11, 0.75), 0.475)
  np.testing.assert_allclose(losses.gbce_beta(3, 11, 0.0), 1.0)   # plain BCE
  np.testing.assert_allclose(losses.gbce_beta(3, 11, 1.0), 0.3)   # beta = alpha


def test_gbce_hand_computed():
  positive = np.array([[2.0, -0.5]])
  negative = np.array([[[1.0, 0.0, -1.0], [0.5, 3.0, 0.0]]])
  targets, negatives = np.array([[5, 7]]), np.array([4, 7, 9])
  beta = losses.gbce_beta(3, 11, 0.75)
  loss, acc, n = losses.gbce_loss(jnp.asarray(positive), jnp.asarray(negative),
                                  jnp.asarray(targets), jnp.asarray(negatives),
                                  jnp.array([[True, True]]), beta=beta)
  sig = lambda x: 1 / (1 + np.exp(-x))
  per_position = [
      -(np.log(sig(2.0) ** 0.475) + np.log(1 - sig(1.0)) + np.log(1 - sig(0.0))
        + np.log(1 - sig(-1.0))) / 4,
      # The negative 7 (score 3) is position 1's target: its term is dropped.
      -(np.log(sig(-0.5) ** 0.475) + np.log(1 - sig(0.5)) + np.log(1 - sig(0.0))) / 4,
  ]
  np.testing.assert_allclose(loss, np.mean(per_position), rtol=1e-6)
  assert float(acc) == 0.5 and float(n) == 2.0


def test_gbce_with_t0_is_plain_bce_and_with_t1_weights_the_positive_by_alpha():
  rng = np.random.default_rng(0)
  positive = rng.normal(size=(2, 3)).astype(np.float32)
  negative = rng.normal(size=(2, 3, 4)).astype(np.float32)
  targets = np.full((2, 3), 30)
  negatives = np.array([2, 5, 9, 11])
  mask = np.ones((2, 3), bool)
  args = (jnp.asarray(positive), jnp.asarray(negative), jnp.asarray(targets),
          jnp.asarray(negatives), jnp.asarray(mask))
  bce = (optax.sigmoid_binary_cross_entropy(positive, np.ones_like(positive))
         + optax.sigmoid_binary_cross_entropy(negative, np.zeros_like(negative)).sum(-1))
  plain, _, _ = losses.gbce_loss(*args, beta=losses.gbce_beta(4, 21, 0.0))
  np.testing.assert_allclose(plain, np.mean(bce) / 5, rtol=1e-5)
  alpha = 4 / 20
  calibrated, _, _ = losses.gbce_loss(*args, beta=losses.gbce_beta(4, 21, 1.0))
  expected = -(alpha * log_sigmoid(positive) + log_sigmoid(-negative).sum(-1)) / 5
  np.testing.assert_allclose(calibrated, np.mean(expected), rtol=1e-5)


@pytest.mark.parametrize("which", ["sampled_softmax", "gbce"])
def test_a_negative_equal_to_the_target_is_excluded(which):
  fn = (losses.sampled_softmax_cross_entropy if which == "sampled_softmax"
        else lambda *a: losses.gbce_loss(*a, beta=0.5))
  targets, negatives = jnp.array([[6, 3]]), jnp.array([3, 6, 8])
  mask = jnp.array([[True, True]])
  positive = jnp.array([[1.0, 0.2]])

  def loss_of(negative):
    return fn(positive, negative, targets, negatives, mask)[0]

  base = jnp.array([[[0.1, -0.4, 0.3], [0.5, -0.2, 0.0]]])
  # Raising the score of a position's own target among the negatives changes nothing
  # there (and gets no gradient); raising any other negative does.
  own = base.at[0, 0, 1].set(50.0).at[0, 1, 0].set(50.0)
  np.testing.assert_allclose(loss_of(own), loss_of(base), rtol=1e-6)
  grad = jax.grad(loss_of)(base)
  assert float(grad[0, 0, 1]) == 0.0 and float(grad[0, 1, 0]) == 0.0
  assert float(loss_of(base.at[0, 0, 0].set(50.0))) > float(loss_of(base)) + 1.0
  # The accuracy ignores the excluded one too: each target outscores its kept negatives.
  assert float(fn(positive, own, targets, negatives, mask)[1]) == 1.0


@pytest.mark.parametrize("which", ["sampled_softmax", "gbce"])
def test_all_masked_is_zero_and_extreme_scores_stay_finite(which):
  fn = (losses.sampled_softmax_cross_entropy if which == "sampled_softmax"
        else lambda *a: losses.gbce_loss(*a, beta=0.3))
  targets, negatives = jnp.array([[4, 0, 1]]), jnp.array([2, 4, 5, 9])
  positive = jnp.array([[-1e4, 3.0, 1e4]])
  negative = jnp.array([[[1e4, -1e4, 0.0, 5.0]] * 3])

  def loss_of(p, n, mask):
    return fn(p, n, targets, negatives, mask)[0]

  for mask in (jnp.zeros((1, 3), bool), jnp.ones((1, 3), bool)):
    value, grads = jax.value_and_grad(loss_of, argnums=(0, 1))(positive, negative, mask)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
  # No valid position (masked, or PAD / OOV targets): exactly 0.
  assert float(loss_of(positive, negative, jnp.zeros((1, 3), bool))) == 0.0
  assert float(loss_of(positive, negative, jnp.array([[False, True, True]]))) == 0.0
  assert float(fn(positive, negative, targets, negatives, jnp.ones((1, 3), bool))[2]) == 1.0


# ------------------------------------------------------------------------------- model


@pytest.mark.parametrize("tied", [True, False])
def test_item_scores_are_columns_of_item_logits(tied):
  model = UserEncoder(CFG.replace(tie_item_head=tied), rngs=nnx.Rngs(0))
  # Non-zero biases, so that gathering them is checked too.
  bias = model.item_bias if tied else model.item_head.bias
  bias[...] = jax.random.normal(jax.random.key(1), bias.shape)
  states = jax.random.normal(jax.random.key(2), (2, 3, CFG.width))
  ids = jnp.array([5, 2, 39, 5, 0, 17])  # repeats and a reserved id are just columns
  full = model.item_logits(states)                                        # [2, 3, V]
  np.testing.assert_allclose(model.item_scores(states, ids), full[..., ids],
                             rtol=1e-5, atol=1e-6)
  targets = jax.random.randint(jax.random.key(3), (2, 3), 0, CFG.num_items)
  np.testing.assert_allclose(model.target_scores(states, targets),
                             jnp.take_along_axis(full, targets[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-6)


def test_without_item_bias_scores_are_dot_products_and_other_parameters_unchanged():
  biased = UserEncoder(CFG, rngs=nnx.Rngs(0))
  plain = UserEncoder(CFG.replace(item_bias=False, item_loss="gbce"), rngs=nnx.Rngs(0))
  assert plain.item_bias is None
  # The same seed gives every other parameter the same value.
  flat = dict(nnx.to_flat_state(nnx.state(biased, nnx.Param)))
  other = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  assert set(flat) - set(other) == {("item_bias",)}
  for path, value in other.items():
    np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(flat[path][...]))
  # A bias that would dominate if it were read: the plain model's scores ignore it.
  biased.item_bias[...] = jnp.full(biased.item_bias.shape, 1e3)
  states = jax.random.normal(jax.random.key(2), (2, 3, CFG.width))
  want = np.asarray(biased.item_logits(states)) - 1e3
  np.testing.assert_allclose(np.asarray(plain.item_logits(states)), want, rtol=1e-4, atol=1e-3)
  ids = jnp.array([5, 2, 39])
  np.testing.assert_allclose(plain.item_scores(states, ids), want[..., [5, 2, 39]],
                             rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="item_bias=False needs tie_item_head=True"):
    CFG.replace(item_bias=False, tie_item_head=False)


def test_the_default_model_has_no_negatives_stream_and_parameters_do_not_depend_on_it():
  softmax = models.build_encoder(CFG.replace(dropout=0.1), seed=3)
  gbce = models.build_encoder(CFG.replace(dropout=0.1, item_loss="gbce"), seed=3)
  assert train_step_lib.rng_stream_names(softmax) == ("dropout",)
  assert softmax.negative_rngs is None
  assert not [p for p, _ in nnx.to_flat_state(nnx.state(softmax))
              if any("negative" in str(k) for k in p)]
  # With the stream, 'dropout' keeps its place (index 0) in the train step's reseeding.
  assert train_step_lib.rng_stream_names(gbce) == ("dropout", "negatives")
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(softmax, nnx.Param)),
               nnx.to_pure_dict(nnx.state(gbce, nnx.Param)))


@pytest.mark.parametrize("item_loss", ["sampled_softmax", "gbce"])
def test_sampled_pretrain_loss(item_loss, batch):
  softmax = UserEncoder(CFG, rngs=nnx.Rngs(0))
  model = UserEncoder(CFG.replace(item_loss=item_loss, item_negatives=16), rngs=nnx.Rngs(0))
  eval_loss = nnx.jit(lambda m, b: m.pretrain_loss(b, deterministic=True))
  # Evaluation samples nothing: the full softmax, as the default model's.
  full, full_metrics = eval_loss(softmax, batch)
  loss, metrics = eval_loss(model, batch)
  assert float(loss) == float(full) and float(metrics["item_loss"]) == float(
      full_metrics["item_loss"])

  @nnx.jit
  def train_loss(model, b):
    return nnx.value_and_grad(lambda m: m.pretrain_loss(b, deterministic=False),
                              has_aux=True)(model)

  (loss, metrics), grads = train_loss(model, batch)
  assert np.isfinite(loss) and float(metrics["item_loss"]) != float(full_metrics["item_loss"])
  assert float(metrics["positions"]) == batch[T.MASK].sum()
  assert 0.0 <= float(metrics["item_accuracy"]) <= 1.0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(optax.tree.norm(grads)) > 0
  # The stream advances: the next call draws other negatives.
  (again, _), _ = train_loss(model, batch)
  assert float(again) != float(loss)
  empty = {k: np.zeros_like(v) for k, v in batch.items()}
  (zero, zero_metrics), zero_grads = train_loss(model, empty)
  assert float(zero_metrics["item_loss"]) == 0.0 and float(zero) == 0.0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(zero_grads))


@pytest.mark.parametrize("tied", [True, False])
def test_per_position_negatives_score_columns_of_item_logits(tied, batch):
  cfg = GBCE.replace(negatives_per="position", tie_item_head=tied)
  model = UserEncoder(cfg, rngs=nnx.Rngs(0))
  twin = nnx.clone(model)   # the same parameters and the same negatives stream
  _, metrics = model.pretrain_loss(batch, deterministic=False)
  targets = jnp.asarray(batch[T.TARGETS_ITEM], jnp.int32)
  negatives = losses.uniform_negatives(twin.negative_rngs.negatives(), cfg.item_negatives,
                                       cfg.num_items, targets.shape)    # [B, E, K]
  # Every position draws its own negatives.
  assert negatives.shape == (*targets.shape, cfg.item_negatives)
  assert not np.array_equal(negatives[0, 0], negatives[0, 1])
  logits = twin.item_logits(twin(batch, deterministic=False))           # [B, E, V]
  positive = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  negative = jnp.take_along_axis(logits, negatives, axis=-1)
  expected, _, _ = losses.gbce_loss(
      positive, negative, targets, negatives, jnp.asarray(batch[T.MASK], bool),
      beta=losses.gbce_beta(cfg.item_negatives, cfg.num_items - schema.FIRST_ID, cfg.gbce_t))
  np.testing.assert_allclose(metrics["item_loss"], expected, rtol=1e-5)
  # The per-step draw scores other negatives: a different loss from the same parameters.
  shared = UserEncoder(GBCE.replace(tie_item_head=tied), rngs=nnx.Rngs(0))
  _, shared_metrics = shared.pretrain_loss(batch, deterministic=False)
  assert float(shared_metrics["item_loss"]) != float(metrics["item_loss"])


def test_negatives_per_is_checked():
  with pytest.raises(ValueError, match=r"negatives_per='batch': must be one of"):
    GBCE.replace(negatives_per="batch")


def single_mesh():
  return sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_train_step_keys_the_negatives_by_seed_and_step(batch):
  model = models.build_encoder(GBCE, seed=0)  # dropout 0: only the negatives vary
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  step, state = train_step_lib.TrainStep.create(
      model, opt, lambda m, b: m.pretrain_loss(b, deterministic=False), mesh=single_mesh(),
      seed=0, donate=False)
  _, a = step(state, batch, 7)
  _, b = step(state, batch, 7)
  _, c = step(state, batch, 8)
  assert float(a["loss"]) == float(b["loss"]) != float(c["loss"])


def train_losses(num_steps: int) -> list[float]:
  model = models.build_encoder(GBCE, seed=0)
  tx = train_step_lib.make_tx(train_step_lib.OptimConfig(
      learning_rate=1e-2, num_steps=num_steps, warmup=3))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step, state = train_step_lib.TrainStep.create(
      model, opt, lambda m, b: m.pretrain_loss(b, deterministic=False), mesh=single_mesh(),
      seed=0)
  data = pipeline.make_pipeline(
      pattern_records(96, GBCE, seed=0), batch_size=32, seed=0, shuffle=True,
      num_epochs=None, transforms=[T.CropAndPad(GBCE.max_len, GBCE.max_categories)],
      shard_index=0, shard_count=1)
  it, out = iter(data), []
  for i in range(num_steps):
    state, metrics = step(state, next(it), i)
    out.append(float(metrics["item_loss"]))
  return out


def test_tiny_gbce_training_lowers_the_loss_and_repeats_exactly():
  first, second = train_losses(40), train_losses(40)
  assert first == second  # same seed: the same negatives, the same run
  assert np.mean(first[-5:]) < 0.7 * np.mean(first[:5]), first
