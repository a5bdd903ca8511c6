"""Tests of the user encoder: config, shapes, masking, losses and learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.data import pipeline
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_PAPER, ENCODER_TINY, EncoderConfig, UserEncoder
from user_llm_jax.encoder import losses
from user_llm_jax.eval import retrieval
from user_llm_jax.params import count_params

CFG = ENCODER_TINY  # 2 layers x width 32, window 8, 40 items


def pattern_records(num_users: int, cfg: EncoderConfig, seed: int = 0) -> list[dict]:
  """Users walk the catalogue with a per-user stride (1 or 3): next item is predictable.

  Rating and category are functions of the item, so every head has signal.
  """
  rng = np.random.default_rng(seed)
  real = cfg.num_items - 2
  records = []
  for u in range(num_users):
    n = int(rng.integers(4, cfg.max_len + 3))
    start, stride = int(rng.integers(real)), int(rng.choice([1, 3]))
    items = 2 + (start + stride * np.arange(n)) % real
    records.append({
        "user_id": f"user{u}".encode(),
        "item_ids": items.astype(np.int32),
        "ratings": (2 + items % (cfg.num_ratings - 2)).astype(np.int32),
        "timestamps": (np.arange(n) * 3600 * (1 + u % 3)).astype(np.int64),
        "category_ids": (2 + items % (cfg.num_categories - 2)).astype(np.int32),
        "category_lengths": np.ones(n, np.int32),
        "favorite_category": np.int32(2),
    })
  return records


def to_batch(records: list[dict], cfg: EncoderConfig) -> dict[str, np.ndarray]:
  crop = T.CropAndPad(cfg.max_len, cfg.max_categories)
  examples = [crop.map(r) for r in records]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
  return to_batch(pattern_records(6, CFG, seed=1), CFG)


# Jitted entry points (eager dispatch of a whole model is slow on a shared CPU).
forward_fn = nnx.jit(lambda m, b: m(b))
train_forward_fn = nnx.jit(lambda m, b: m(b, deterministic=False))
loss_fn = nnx.jit(lambda m, b: m.pretrain_loss(b, deterministic=True))


@pytest.fixture(scope="module")
def tiny_model() -> UserEncoder:
  return UserEncoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=["early", "late"])
def fusion_model(request):
  """A tiny model of each fusion and a jitted forward (compiled once per module)."""
  cfg = CFG.replace(fusion=request.param)
  return UserEncoder(cfg, rngs=nnx.Rngs(0)), forward_fn


class TestConfig:

  def test_presets(self):
    assert (ENCODER_PAPER.num_layers, ENCODER_PAPER.width, ENCODER_PAPER.max_len) == (6, 128, 50)
    assert ENCODER_PAPER.num_heads == 4 and ENCODER_PAPER.mlp_dim == 512
    assert ENCODER_PAPER.fusion == "early" and ENCODER_PAPER.param_dtype == jnp.float32
    assert CFG.replace(width=64).width == 64 and CFG.width == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
      CFG.width = 3  # type: ignore[misc]

  @pytest.mark.parametrize("kw,message", [
      ({"fusion": "middle"}, "fusion='middle'"),
      ({"width": 30, "num_heads": 4}, "not divisible by num_heads"),
      ({"num_items": 2}, "num_items=2"),
      ({"dropout": 1.0}, "dropout"),
      ({"num_layers": 0}, "num_layers"),
      ({"item_loss_weight": -1.0}, "loss weights"),
      ({"item_loss_chunk": -1}, "item_loss_chunk"),
      ({"init_std": -0.02}, "init_std=-0.02"),
  ])
  def test_validation_names_the_field(self, kw, message):
    with pytest.raises(ValueError, match=message):
      CFG.replace(**kw)


class TestModel:

  @pytest.mark.parametrize("fusion", ["early", "late"])
  def test_shapes_via_eval_shape(self, fusion, batch):
    cfg = CFG.replace(fusion=fusion)
    abstract = nnx.eval_shape(lambda: UserEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def apply(state, b):
      model = nnx.merge(graphdef, state)
      return model(b), model.next_item_logits(b), model.pretrain_loss(b, deterministic=True)

    out, logits, (loss, metrics) = jax.eval_shape(apply, state, batch)
    assert out.shape == (6, cfg.max_len, cfg.width) and out.dtype == jnp.float32
    assert logits.shape == (6, cfg.num_items)
    assert loss.shape == () and all(v.shape == () for v in metrics.values())

  @pytest.mark.parametrize("fusion", ["early", "late"])
  def test_every_param_has_logical_axes(self, fusion):
    model = nnx.eval_shape(lambda: UserEncoder(CFG.replace(fusion=fusion), rngs=nnx.Rngs(0)))
    rules = dict(sharding.DEFAULT_RULES)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var.ndim, path
      assert all(n in rules and not n.startswith("activation_") for n in names), (path, names)
      assert var.dtype == jnp.float32, path

  def test_late_fusion_has_one_encoder_per_feature(self):
    def build(**kw):
      return nnx.eval_shape(lambda: UserEncoder(CFG.replace(**kw), rngs=nnx.Rngs(0)))

    early, late = build(), build(fusion="late", late_fusion_layers=1)
    assert len(late.fusion.encoders) == CFG.num_features == 4
    assert all(len(e.blocks) == 1 for e in late.fusion.encoders)
    assert count_params(late) > count_params(early)
    assert count_params(build(use_time=False)) < count_params(early)
    untied = build(tie_item_head=False)
    assert untied.item_head is not None and early.item_head is None

  def test_padding_does_not_touch_valid_positions(self, fusion_model, batch):
    model, forward = fusion_model
    base = np.asarray(forward(model, batch))
    noisy = {k: v.copy() for k, v in batch.items()}
    pad = ~batch[T.MASK]
    assert pad.any()
    rng = np.random.default_rng(0)
    for key, vocab in ((T.INPUTS_ITEM, CFG.num_items), (T.INPUTS_RATING, CFG.num_ratings),
                       (T.INPUTS_TIME, CFG.num_time_buckets)):
      noisy[key] = np.where(pad, rng.integers(2, vocab, pad.shape), batch[key]).astype(np.int32)
    noisy[T.INPUTS_CATEGORY] = np.where(
        pad[..., None], rng.integers(2, CFG.num_categories, pad.shape + (CFG.max_categories,)),
        batch[T.INPUTS_CATEGORY]).astype(np.int32)
    changed = np.asarray(forward(model, noisy))
    np.testing.assert_array_equal(changed[batch[T.MASK]], base[batch[T.MASK]])

  def test_causality(self, fusion_model, batch):
    model, forward = fusion_model
    base = np.asarray(forward(model, batch))
    t = 2  # change event t of every example: positions < t must not move
    later = {k: v.copy() for k, v in batch.items()}
    later[T.INPUTS_ITEM][:, t] = 2 + (later[T.INPUTS_ITEM][:, t] + 5) % (CFG.num_items - 2)
    later[T.INPUTS_RATING][:, t] = 2
    later[T.INPUTS_CATEGORY][:, t] = CFG.num_categories - 1
    later[T.INPUTS_TIME][:, t] = 5
    changed = np.asarray(forward(model, later))
    np.testing.assert_array_equal(changed[:, :t], base[:, :t])
    moved = batch[T.MASK][:, t]
    assert not np.allclose(changed[moved, t], base[moved, t])  # the change is visible

  def test_input_norm_makes_the_blocks_blind_to_the_input_scale(self, batch):
    # With `input_norm` the first block reads LayerNorm(events + positions): scaling the
    # fused input projection and the positions by the same factor changes nothing
    # but rounding (the factors keep the input far above LayerNorm's epsilon). Without it,
    # the small embeddings' scale reaches every block (the reason it exists).
    def outputs(input_norm: bool, scale: float) -> np.ndarray:
      model = UserEncoder(CFG.replace(input_norm=input_norm), rngs=nnx.Rngs(0))
      fusion = model.fusion
      fusion.project.kernel[...] = fusion.project.kernel[...] * scale
      fusion.project.bias[...] = fusion.project.bias[...] * scale
      fusion.encoder.positions[...] = fusion.encoder.positions[...] * scale
      return np.asarray(forward_fn(model, batch))

    valid = batch[T.MASK].astype(bool)
    np.testing.assert_allclose(outputs(True, 50.0)[valid], outputs(True, 5.0)[valid],
                               atol=1e-3)
    assert not np.allclose(outputs(False, 50.0)[valid], outputs(False, 5.0)[valid], atol=1e-2)
    assert UserEncoder(CFG, rngs=nnx.Rngs(0)).fusion.encoder.input_norm is None  # no new params

  def test_small_init_starts_every_block_near_the_identity(self, batch):
    # init_std: every kernel normal(init_std); at 1e-4 each block adds ~nothing, so the
    # states are the normalised input events (what the tied head then scores items with).
    model = UserEncoder(CFG.replace(init_std=1e-4, input_norm=True), rngs=nnx.Rngs(0))
    fusion = model.fusion
    np.testing.assert_allclose(float(jnp.std(fusion.project.kernel[...])), 1e-4, rtol=0.2)
    fusion.project.kernel[...] = jax.random.normal(jax.random.key(1),
                                                   fusion.project.kernel[...].shape)
    features = model.features(batch)
    fused = fusion.project(jnp.concatenate(features, axis=-1))
    length = fused.shape[1]
    expected = model.final_norm(fusion.encoder.input_norm(
        fused + fusion.encoder.positions[...][:length][None]))
    valid = batch[T.MASK].astype(bool)
    np.testing.assert_allclose(np.asarray(forward_fn(model, batch))[valid],
                               np.asarray(expected)[valid], atol=1e-2)
    lecun = UserEncoder(CFG.replace(input_norm=True), rngs=nnx.Rngs(0))
    lecun.fusion.project.kernel[...] = fusion.project.kernel[...]
    assert not np.allclose(np.asarray(forward_fn(lecun, batch))[valid],
                           np.asarray(expected)[valid], atol=1e-1)

  def test_dropout_is_keyed_and_off_when_deterministic(self, batch):
    cfg = CFG.replace(dropout=0.3)
    model = UserEncoder(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    a = forward_fn(model, batch)
    np.testing.assert_array_equal(a, forward_fn(model, batch))
    b = train_forward_fn(model, batch)
    assert not np.allclose(a, b)
    again = UserEncoder(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    np.testing.assert_array_equal(b, train_forward_fn(again, batch))

  def test_bfloat16_compute(self, batch):
    model = UserEncoder(CFG.replace(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    out = forward_fn(model, batch)
    assert out.dtype == jnp.bfloat16
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.float32
    loss, _ = loss_fn(model, batch)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)

  def test_missing_keys_and_too_long(self, batch, tiny_model):
    model = tiny_model
    with pytest.raises(KeyError, match="inputs_time"):
      model({k: v for k, v in batch.items() if k != T.INPUTS_TIME})
    long = to_batch(pattern_records(2, CFG.replace(max_len=12)), CFG.replace(max_len=12))
    with pytest.raises(ValueError, match="max_len is 8"):
      model(long)

  def test_sharded_forward_matches_unsharded(self, batch):
    cfg = CFG.replace(num_ratings=8)  # every vocab divisible by the mesh axes
    model = UserEncoder(cfg, rngs=nnx.Rngs(0))
    want = forward_fn(model, batch)
    mesh = sharding.make_mesh((2, 2, 2))
    sharding.shard_model(model, mesh)
    with jax.set_mesh(mesh):
      got = nnx.jit(lambda m, b: m(b))(model, batch)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_rules_context_reshards_params_and_activations_alike(self):
    """A job's `mesh.rules`, made active once, moves the weights and the event states."""
    cfg = CFG.replace(num_ratings=8)
    batch = to_batch(pattern_records(8, CFG, seed=1), CFG)  # 8 rows: divisible by any axis
    model = UserEncoder(cfg, rngs=nnx.Rngs(0))
    want = forward_fn(model, batch)
    mesh = sharding.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(model)

    def output_spec(state):
      """Sharding of the forward's output: the last op is the encoder's constraint."""
      fn = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
      compiled = fn.lower(state, batch).compile()
      return compiled.output_shardings, fn(state, batch)

    rules = (("embed", "tensor"), ("mlp", "fsdp"), ("activation_batch", "data"),
             ("activation_embed", "tensor"))
    with sharding.axis_rules(rules, mesh):
      sharding.shard_model(model, mesh)
      spec, got = output_spec(nnx.state(model))
    P = jax.sharding.PartitionSpec
    assert model.fusion.encoder.blocks[0].mlp.up.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert spec.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data", None, "tensor")), 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The defaults: batch over data x fsdp, the width replicated.
    with sharding.axis_rules((), mesh):
      sharding.shard_model(model, mesh)
      spec, _ = output_spec(nnx.state(model))
    assert model.fusion.encoder.blocks[0].mlp.up.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert spec.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)


class TestLoss:

  def test_all_padding_batch_is_finite_zero(self, batch, tiny_model):
    empty = {k: np.zeros_like(v) for k, v in batch.items()}

    @nnx.jit
    def loss_and_grads(model, b):
      return nnx.value_and_grad(
          lambda m: m.pretrain_loss(b, deterministic=True), has_aux=True)(model)

    (loss, metrics), grads = loss_and_grads(tiny_model, empty)
    assert float(loss) == 0.0 and float(metrics["positions"]) == 0.0
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.isfinite(forward_fn(tiny_model, empty)).all()

  def test_example_mask_and_reserved_targets_carry_no_weight(self, batch, tiny_model):
    model = tiny_model
    _, metrics = loss_fn(model, batch)
    assert metrics["positions"] == batch[T.MASK].sum()
    masked = dict(batch, example_mask=np.array([True] * 5 + [False]))
    _, masked_metrics = loss_fn(model, masked)
    assert masked_metrics["positions"] == batch[T.MASK][:5].sum()
    oov = {k: v.copy() for k, v in batch.items()}
    oov[T.TARGETS_ITEM][0, 0] = 1
    _, oov_metrics = loss_fn(model, oov)
    assert oov_metrics["positions"] == batch[T.MASK].sum() - 1

  @pytest.mark.parametrize("empty", [False, True])
  def test_chunked_item_loss_matches_full(self, batch, empty):
    if empty:
      batch = {k: np.zeros_like(v) for k, v in batch.items()}

    @nnx.jit
    def loss_and_grads(model, b):
      return nnx.value_and_grad(
          lambda m: m.pretrain_loss(b, deterministic=True), has_aux=True)(model)

    results = []
    for chunk in (0, 7):  # 7 does not divide 6 x 8 positions: the last chunk is padded
      model = UserEncoder(CFG.replace(item_loss_chunk=chunk), rngs=nnx.Rngs(0))
      results.append(loss_and_grads(model, batch))
    ((full, full_metrics), full_grads), ((chunked, metrics), grads) = results
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    for key in ("item_loss", "item_accuracy", "positions"):
      np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
      np.testing.assert_allclose(a, b, atol=1e-6)
      assert np.isfinite(a).all()

  def test_hand_computed_losses(self):
    logits = jnp.log(jnp.array([[[1.0, 1.0, 1.0, 3.0], [5.0, 5.0, 2.0, 2.0]]]))  # [1, 2, 4]
    loss, acc, n = losses.softmax_cross_entropy(
        logits, jnp.array([[3, 3]]), jnp.array([[True, True]]))
    # Reserved columns are excluded: p(3) = 3/4 at position 0, 1/2 at position 1 where the
    # 2-3 tie goes to id 2 (argmax), so only position 0 is accurate.
    np.testing.assert_allclose(loss, -(np.log(0.75) + np.log(0.5)) / 2, rtol=1e-6)
    assert float(acc) == 0.5 and float(n) == 2.0
    labels = losses.multi_hot(jnp.array([[[3, 0, 1]]]), 5)
    np.testing.assert_array_equal(labels, [[[0, 0, 0, 1, 0]]])
    bce = losses.multi_label_loss(jnp.zeros((1, 1, 5)), jnp.array([[[3, 0, 1]]]),
                                  jnp.array([[True]]))
    np.testing.assert_allclose(bce, np.log(2.0), rtol=1e-6)  # sigmoid(0) on 3 real columns


def test_item_softmax_matches_the_reference_form_value_accuracy_and_gradient():
  """The fast form (added reserved bias, target score given, accuracy against the row max)
  equals optax's integer-label cross-entropy with masked columns and an argmax, gradient
  included; where the top is tied it counts the target correct (the reference's argmax
  picks the lower id)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(schema.FIRST_ID, 11, size=(3, 5)), jnp.int32)
  targets = targets.at[0, 0].set(schema.PAD_ID).at[1, 2].set(schema.OOV_ID)
  mask = jnp.asarray(rng.random((3, 5)) > 0.2)

  def fast(x):
    target = jnp.take_along_axis(x, jnp.maximum(targets, 0)[..., None], -1)[..., 0]
    return losses.item_softmax_cross_entropy(x, target, targets, mask)

  def reference(x):
    return losses.softmax_cross_entropy(x, targets, mask)

  (got, got_acc, got_n), (want, want_acc, want_n) = fast(logits), reference(logits)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_acc, want_acc)
  assert float(got_n) == float(want_n) == float(
      (mask & (targets >= schema.FIRST_ID)).sum())
  np.testing.assert_allclose(jax.grad(lambda x: fast(x)[0])(logits),
                             jax.grad(lambda x: reference(x)[0])(logits), atol=1e-7)
  # A 2-3 tie at the top: argmax says id 2, the row-max comparison counts target 3.
  tied = jnp.log(jnp.array([[[5.0, 5.0, 2.0, 2.0]]]))
  _, acc, _ = losses.item_softmax_cross_entropy(tied, tied[..., 3], jnp.array([[3]]),
                                                jnp.array([[True]]))
  assert float(acc) == 1.0
  # A reserved column never wins: it holds the largest raw logit here.
  big_reserved = jnp.array([[[9.0, 9.0, 1.0, 0.0]]])
  loss, acc, _ = losses.item_softmax_cross_entropy(
      big_reserved, big_reserved[..., 2], jnp.array([[2]]), jnp.array([[True]]))
  np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)), rtol=1e-6)
  assert float(acc) == 1.0


@pytest.mark.parametrize("tie", [True, False])
def test_model_item_loss_equals_the_reference_form(batch, tie):
  """The model's item loss (target scores by gathered item vectors) equals the reference
  cross-entropy on its full logits, for the tied and the separate head."""
  model = UserEncoder(CFG.replace(tie_item_head=tie, dropout=0.0), rngs=nnx.Rngs(3))
  _, metrics = model.pretrain_loss(batch, deterministic=True)
  states = model(batch, deterministic=True)
  mask = jnp.asarray(batch[T.MASK], bool)
  want, want_acc, _ = losses.softmax_cross_entropy(model.item_logits(states),
                                                   batch[T.TARGETS_ITEM], mask)
  np.testing.assert_allclose(metrics["item_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(metrics["item_accuracy"], want_acc)


def test_training_learns_the_pattern_and_ranks_targets():
  """A few hundred optax steps on stride patterns reach high full-catalogue recall."""
  cfg = CFG
  train = pattern_records(96, cfg, seed=0)
  test = pattern_records(48, cfg, seed=1)
  model = UserEncoder(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    (loss, _), grads = nnx.value_and_grad(
        lambda m: m.pretrain_loss(batch), has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  transforms = [T.CropAndPad(cfg.max_len, cfg.max_categories)]
  data = pipeline.make_pipeline(train, batch_size=32, seed=0, shuffle=True, num_epochs=None,
                                transforms=transforms, shard_index=0, shard_count=1)
  it = iter(data)
  losses_seen = [float(step(model, optimizer, next(it))) for _ in range(150)]
  assert np.mean(losses_seen[-10:]) < 0.5 * np.mean(losses_seen[:10])
  evals = pipeline.make_eval_pipeline(test, batch_size=16, transforms=transforms,
                                      shard_index=0, shard_count=1)
  metrics = retrieval.evaluate_next_item(model, evals)
  assert metrics["num_examples"] == 48
  assert metrics["recall@1"] > 0.8, metrics
  assert metrics["recall@10"] > 0.95, metrics
