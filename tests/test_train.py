"""Tests of the generic trainer on a tiny regression model defined here."""

import dataclasses
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import params as params_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.train import checkpointing
from user_llm_jax.train import train_step as train_step_lib
from user_llm_jax.train import trainer as trainer_lib

D_IN, D_HID = 8, 16


class TinyRegressor(nnx.Module):
  """Two-layer MLP with dropout; params annotated with logical axes."""

  def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.1):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(D_IN, D_HID, rngs=rngs,
                         kernel_init=sharding_lib.partitioned(init, ("embed", "mlp")),
                         bias_init=sharding_lib.partitioned(nnx.initializers.zeros, ("mlp",)))
    self.down = nnx.Linear(D_HID, 1, rngs=rngs,
                           kernel_init=sharding_lib.partitioned(init, ("mlp", None)),
                           bias_init=sharding_lib.partitioned(nnx.initializers.zeros, (None,)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    return self.down(self.dropout(jax.nn.gelu(self.up(x))))[..., 0]


def tiny_loss(model, batch):
  pred = model(batch["x"])
  err = jnp.mean((pred - batch["y"]) ** 2)
  return err, {"mse": err}


def make_model(seed: int = 0) -> TinyRegressor:
  with nnx.use_eager_sharding(False):
    return TinyRegressor(rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def make_data(n: int = 256, nan_at: int | None = None) -> list[dict]:
  rng = np.random.default_rng(0)
  w = rng.normal(size=D_IN).astype(np.float32)
  x = rng.normal(size=(n, D_IN)).astype(np.float32)
  y = np.tanh(x @ w).astype(np.float32)
  if nan_at is not None:
    x[nan_at] = np.nan
  return [{"x": x[i], "y": y[i]} for i in range(n)]


def make_iter(records, batch_size=16, seed=0):
  ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat()
  return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def single_mesh():
  return sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])


CFG = trainer_lib.TrainConfig(batch_size=16, num_steps=40, learning_rate=1e-2, warmup=5,
                              log_every=10, eval_every=0, checkpoint_every=10)


def params_of(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_loss_decreases_and_is_deterministic():
  results = []
  for _ in range(2):
    model = make_model()
    res = trainer_lib.train(model, tiny_loss, CFG, make_iter(make_data()), mesh=single_mesh(),
                            seed=3, count_fn=lambda b: len(b["y"]))
    results.append(res)
  first, last = results[0].history[0]["loss"], results[0].history[-1]["loss"]
  assert last < 0.6 * first, results[0].history
  assert [h["step"] for h in results[0].history] == [10, 20, 30, 40]
  assert results[0].trainable_params == results[0].total_params == D_IN * D_HID + D_HID * 2 + 1
  # Same seed, same data order -> bit-identical params.
  jax.tree.map(np.testing.assert_array_equal, params_of(results[0].model),
               params_of(results[1].model))


def test_dropout_keys_depend_on_seed_and_step_only():
  model = make_model()
  opt = nnx.Optimizer(model, train_step_lib.make_tx(CFG.optim()), wrt=nnx.Param)
  step, state = train_step_lib.TrainStep.create(model, opt, tiny_loss, mesh=single_mesh(),
                                                seed=0, donate=False)
  batch = next(make_iter(make_data()))
  _, m_a = step(state, batch, 7)
  _, m_b = step(state, batch, 7)
  _, m_c = step(state, batch, 8)
  assert float(m_a["loss"]) == float(m_b["loss"])
  assert float(m_a["loss"]) != float(m_c["loss"])


def test_frozen_params_stay_bit_identical():
  model = make_model()
  before = params_of(model)
  only_up = nnx.All(nnx.Param, nnx.PathContains("up"))
  res = trainer_lib.train(model, tiny_loss, CFG, make_iter(make_data()), mesh=single_mesh(),
                          wrt=only_up)
  after = params_of(res.model)
  np.testing.assert_array_equal(before["down"]["kernel"], after["down"]["kernel"])
  assert not np.array_equal(before["up"]["kernel"], after["up"]["kernel"])
  assert res.trainable_params == D_IN * D_HID + D_HID < res.total_params


def test_nan_guard_names_step_and_saves_nothing_bad(tmp_path):
  # No shuffle: 12 clean batches, then a batch holding a NaN input (step 13).
  clean = make_data(n=16 * 12)
  bad = make_data(n=16, nan_at=3)
  records = clean + bad
  ds = grain.MapDataset.source(records).batch(16, drop_remainder=True).repeat()
  cfg = trainer_lib.TrainConfig(batch_size=16, num_steps=40, learning_rate=1e-2, warmup=2,
                                log_every=5, eval_every=0, checkpoint_every=5)
  with pytest.raises(train_step_lib.NonFiniteError, match=r"non-finite training step 13\b"):
    trainer_lib.train(make_model(), tiny_loss, cfg, iter(ds.to_iter_dataset()),
                      mesh=single_mesh(), workdir=str(tmp_path))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), every=5)
  assert ckpt.all_steps() == [5, 10]
  # The saved state is finite.
  model = make_model()
  opt = nnx.Optimizer(model, train_step_lib.make_tx(cfg.optim()), wrt=nnx.Param)
  _, state = train_step_lib.TrainStep.create(model, opt, tiny_loss, mesh=single_mesh())
  state, _, step = ckpt.restore(state)
  assert step == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(nnx.to_pure_dict(state)))


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
  cfg = dataclass_replace(CFG, eval_every=5, checkpoint_every=100)
  data = make_data()
  full = trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(data), mesh=single_mesh(),
                           seed=1, workdir=str(tmp_path / "full"), eval_fn=lambda m: {})

  def eval_and_term(m, calls=[0]):
    calls[0] += 1
    if calls[0] == 3:  # at step 15
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  work = str(tmp_path / "interrupted")
  part = trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(data), mesh=single_mesh(),
                           seed=1, workdir=work, eval_fn=eval_and_term)
  assert part.preempted and part.step == 15
  assert checkpointing.Checkpointer(os.path.join(work, "checkpoints"), every=1).all_steps() == [15]
  rest = trainer_lib.train(make_model(seed=99), tiny_loss, cfg, make_iter(data),
                           mesh=single_mesh(), seed=1, workdir=work, eval_fn=lambda m: {})
  assert rest.resumed_from == 15 and rest.step == cfg.num_steps
  jax.tree.map(np.testing.assert_array_equal, params_of(full.model), params_of(rest.model))
  assert rest.history == full.history
  # Compute across sessions: the checkpoint records the loop seconds up to it, and the
  # resumed run reports them plus its own; a fresh run's total is its own.
  assert full.total_wall_time == full.wall_time and part.total_wall_time == part.wall_time
  saved = checkpointing.Checkpointer(os.path.join(work, "checkpoints"), every=1).read_meta(15)
  earlier = saved["extra"]["loop_seconds"]
  assert 0 < earlier <= part.wall_time
  assert rest.total_wall_time == pytest.approx(earlier + rest.wall_time)


def test_incompatible_and_corrupt_checkpoints_are_clear_errors(tmp_path):
  cfg = dataclass_replace(CFG, num_steps=10, checkpoint_every=10)
  trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                    workdir=str(tmp_path), fingerprint={"model": {"width": 16}})
  with pytest.raises(checkpointing.CheckpointError, match=r"incompatible config.*model\.width"):
    trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                      workdir=str(tmp_path), fingerprint={"model": {"width": 32}})
  # A key saved at the value today's fingerprint leaves out is no difference (a run
  # written while that key was still recorded); at another value it is named.
  saved = {"model": {"width": 16}, "data": {"train_through_validation": False}}
  trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                    workdir=str(tmp_path / "old"), fingerprint=saved)
  again = trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()),
                            mesh=single_mesh(), workdir=str(tmp_path / "old"),
                            fingerprint={"model": {"width": 16}, "data": {}})
  assert again.resumed_from == 10
  saved["data"]["train_through_validation"] = True
  trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                    workdir=str(tmp_path / "refit"), fingerprint=saved)
  with pytest.raises(checkpointing.CheckpointError, match="data.train_through_validation"):
    trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                      workdir=str(tmp_path / "refit"),
                      fingerprint={"model": {"width": 16}, "data": {}})
  # Corrupt the array data of the saved state.
  state_dir = tmp_path / "checkpoints" / "10" / "model"
  for path in state_dir.rglob("*"):
    if path.is_file() and "metadata" not in path.name:
      path.write_bytes(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match=str(tmp_path / "checkpoints" / "10")):
    trainer_lib.train(make_model(), tiny_loss, cfg, make_iter(make_data()), mesh=single_mesh(),
                      workdir=str(tmp_path), fingerprint={"model": {"width": 16}})


def dataclass_replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)


def test_lr_mults_scale_exactly_the_matched_updates():
  """A rule multiplies the update of the parameters it matches and leaves the rest alone."""
  model = make_model()
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  base = train_step_lib.OptimConfig(learning_rate=1e-2, num_steps=10, warmup=0,
                                    weight_decay=0.0, grad_clip=0.0)
  scaled = dataclasses.replace(base, lr_mults=(("down/bias$", 7.0),))
  params = nnx.state(model, nnx.Param)
  plain_tx, mult_tx = train_step_lib.make_tx(base), train_step_lib.make_tx(scaled)
  plain, _ = plain_tx.update(grads, plain_tx.init(params), params)
  mult, _ = mult_tx.update(grads, mult_tx.init(params), params)
  plain, mult = nnx.to_pure_dict(plain), nnx.to_pure_dict(mult)
  np.testing.assert_allclose(mult["down"]["bias"], 7.0 * plain["down"]["bias"], rtol=1e-6)
  assert np.any(np.asarray(plain["down"]["bias"]) != 0)
  for path in (("down", "kernel"), ("up", "kernel"), ("up", "bias")):
    np.testing.assert_array_equal(mult[path[0]][path[1]], plain[path[0]][path[1]])


def test_lr_mults_bad_rules_are_config_errors():
  from user_llm_jax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="lr_mults"):
    config_lib.to_dataclass(trainer_lib.TrainConfig, {"lr_mults": (("gate", -1.0),)}, "train")
  with pytest.raises(config_lib.ConfigError, match="does not compile"):
    config_lib.to_dataclass(trainer_lib.TrainConfig, {"lr_mults": (("gate(", 2.0),)}, "train")
  assert params_lib.param_path(
      (jax.tree_util.DictKey("llm"), jax.tree_util.GetAttrKey("cross_attention"),
       jax.tree_util.DictKey(0), jax.tree_util.DictKey("attn_gate"))) == (
           "llm/cross_attention/0/attn_gate")
