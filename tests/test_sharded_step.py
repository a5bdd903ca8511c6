"""The train step on a 2x4 mesh of fake CPU devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import sharding as sharding_lib
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import config as enc_lib
from user_llm_jax.encoder import model as enc_model
from user_llm_jax.train import checkpointing
from user_llm_jax.train import train_step as train_step_lib
from user_llm_jax.train import trainer as trainer_lib

# float32 reductions are re-associated across shards, so equality is up to rounding.
RTOL, ATOL = 1e-5, 1e-6
# With the repeat bias: its [B, E, V] running maximum over the events shards like the logits.
CFG = enc_lib.ENCODER_TINY.replace(width=32, num_heads=4, mlp_dim=64, dropout=0.1,
                                   repeat_bias=True)
TRAIN = trainer_lib.TrainConfig(batch_size=16, num_steps=10, learning_rate=3e-3, warmup=1)


def make_batches(num: int, batch_size: int = 16) -> list[dict]:
  rng = np.random.default_rng(0)
  crop = T.CropAndPad(CFG.max_len, CFG.max_categories)
  batches = []
  for _ in range(num):
    examples = []
    for _ in range(batch_size):
      n = int(rng.integers(3, CFG.max_len + 3))
      lengths = rng.integers(1, 3, size=n).astype(np.int32)
      examples.append(crop.map({
          schema.ITEM_IDS: rng.integers(schema.FIRST_ID, CFG.num_items, n).astype(np.int32),
          schema.RATINGS: rng.integers(schema.FIRST_ID, CFG.num_ratings, n).astype(np.int32),
          schema.TIMESTAMPS: np.sort(rng.integers(0, 10**6, n)).astype(np.int64),
          schema.CATEGORY_IDS: rng.integers(schema.FIRST_ID, CFG.num_categories,
                                            int(lengths.sum())).astype(np.int32),
          schema.CATEGORY_LENGTHS: lengths,
      }))
    batches.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return batches


def run_steps(mesh, batches):
  with nnx.use_eager_sharding(False):
    model = enc_model.UserEncoder(CFG, rngs=nnx.Rngs(params=0, dropout=1))
  opt = nnx.Optimizer(model, train_step_lib.make_tx(TRAIN.optim()), wrt=nnx.Param)
  step, state = train_step_lib.TrainStep.create(
      model, opt, lambda m, b: m.pretrain_loss(b, deterministic=False), mesh=mesh, seed=5)
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, i)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def runs():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                "(set by tests/conftest.py) was overridden")
  batches = make_batches(3)
  single = run_steps(sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batches)
  sharded = run_steps(sharding_lib.make_mesh((2, 4, 1)), batches)
  return single, sharded


def test_sharded_losses_match(runs):
  (single_losses, _), (sharded_losses, _) = runs
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=RTOL, atol=ATOL)
  assert single_losses[-1] < single_losses[0]  # The steps did train.


def test_sharded_params_match_and_are_sharded(runs):
  (_, single_state), (_, sharded_state) = runs
  a = nnx.to_pure_dict(single_state)
  b = nnx.to_pure_dict(sharded_state)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x),
                                                       rtol=RTOL, atol=ATOL), a, b)
  # The width axis of the item embedding table really is split 4 ways over 'fsdp'.
  shard_shapes = {tuple(x.sharding.shard_shape(x.shape)) != tuple(x.shape)
                  for x in jax.tree.leaves(b)}
  assert True in shard_shapes
  assert len(next(iter(jax.tree.leaves(b))).sharding.device_set) == 8


def test_checkpoint_restores_onto_another_mesh(runs, tmp_path):
  (_, single_state), _ = runs
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1)
  ckpt.save(3, single_state)
  # A fresh model/optimizer placed on the 2x4 mesh is the restore target.
  with nnx.use_eager_sharding(False):
    model = enc_model.UserEncoder(CFG, rngs=nnx.Rngs(params=1, dropout=1))
  opt = nnx.Optimizer(model, train_step_lib.make_tx(TRAIN.optim()), wrt=nnx.Param)
  _, target = train_step_lib.TrainStep.create(
      model, opt, lambda m, b: m.pretrain_loss(b), mesh=sharding_lib.make_mesh((2, 4, 1)))
  shardings = [x.sharding for x in jax.tree.leaves(nnx.to_pure_dict(target))]
  restored, _, step = ckpt.restore(target)
  assert step == 3
  leaves = jax.tree.leaves(nnx.to_pure_dict(restored))
  assert [x.sharding for x in leaves] == shardings  # Laid out for the new mesh ...
  for x, y in zip(leaves, jax.tree.leaves(nnx.to_pure_dict(single_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # ... bit-identical values.


def test_train_step_follows_the_rules_context():
  """Rules active at creation place state and batches, and shape the step's activations."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  P = jax.sharding.PartitionSpec
  mesh = sharding_lib.make_mesh((2, 2, 2))
  seen = []

  def loss_fn(model, batch):
    h = model(batch["x"])[:, None, :]                                   # [B, 1, F]
    h = sharding_lib.with_logical_constraint(h, sharding_lib.ACT_BTF)
    jax.debug.inspect_array_sharding(h, callback=seen.append)
    loss = jax.numpy.mean(h ** 2)
    return loss, {}

  def create(**kwargs):
    init = sharding_lib.partitioned(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with nnx.use_eager_sharding(False):
      model = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, train_step_lib.make_tx(TRAIN.optim()), wrt=nnx.Param)
    return train_step_lib.TrainStep.create(model, opt, loss_fn, mesh=mesh, **kwargs)

  rules = (("embed", "tensor"), ("mlp", "fsdp"), ("activation_batch", "data"),
           ("activation_mlp", "tensor"))
  with sharding_lib.axis_rules(rules):
    step, state = create()
    default_step, default_state = create(rules=())  # explicit rules win over the context
  assert state[0]["kernel"][...].sharding.spec == P("tensor", "fsdp")
  assert step.batch_sharding.spec == P("data")
  assert default_state[0]["kernel"][...].sharding.spec == P("fsdp", "tensor")
  assert default_step.batch_sharding.spec == P(("data", "fsdp"))
  # Traced at the first call, outside the context: the step re-enters its own rules.
  batch = {"x": np.ones((8, 8), np.float32)}
  step(state, batch, 0)
  default_step(default_state, batch, 0)
  custom, default = seen
  assert custom.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data", None, "tensor")), 3)
  assert default.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
