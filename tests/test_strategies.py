"""Training strategies Full / LoRA / Enc / Proj: each trains exactly the parameters it names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax.bridge import strategies
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.llm import lora
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

B, T = 2, 8
E = ENCODER_TINY.max_len

# Encoder parameters the LLM loss never reaches: the next-event pretraining heads.
PRETRAIN_HEADS = ("item_query", "item_bias", "item_head", "rating_head", "category_head")


def make_batch():
  rng = np.random.default_rng(0)
  mask = np.arange(E)[None] < np.array([[E], [4]])
  ids = lambda high, shape: np.where(  # noqa: E731
      mask.reshape(mask.shape + (1,) * (len(shape) - 2)), rng.integers(2, high, shape), 0
  ).astype(np.int32)
  return {
      "inputs_item": ids(ENCODER_TINY.num_items, (B, E)),
      "inputs_rating": ids(ENCODER_TINY.num_ratings, (B, E)),
      "inputs_category": ids(ENCODER_TINY.num_categories, (B, E, 3)),
      "inputs_time": ids(ENCODER_TINY.num_time_buckets, (B, E)),
      "mask": mask,
      "tokens": rng.integers(0, LLM_CFG.vocab_size, (B, T)).astype(np.int32),
      "loss_mask": np.arange(T)[None] >= np.array([[4], [5]]),
  }


# Smaller than the presets (fewer layers) to keep the gradient compile short; every
# parameter group is still present.
LLM_CFG = LLM_TINY.replace(num_layers=2)
ENCODER_CFG = ENCODER_TINY.replace(num_layers=1)


@pytest.fixture(scope="module")
def base_model():
  """Cross-attention User-LLM with a Perceiver and LoRA on q/v: every group is present."""
  llm = Decoder(LLM_CFG, rngs=nnx.Rngs(0))
  lora.apply_lora(llm, lora.LoraConfig(rank=2, targets=("q", "v")), rngs=nnx.Rngs(1))
  cfg = ullm.UserLlmConfig(mode="cross_attention", use_perceiver=True, num_latents=4,
                           perceiver_layers=1, perceiver_heads=2, xattn_every=1)
  model = ullm.UserLLM(cfg, encoder=UserEncoder(ENCODER_CFG, rngs=nnx.Rngs(2)), llm=llm,
                       rngs=nnx.Rngs(3))
  # Open the gates so the cross-attention weights receive gradients at the first step.
  for blk in model.llm.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(0.5)
    blk.mlp_gate[...] = jnp.asarray(0.5)
  return model


def flat_params(model, wrt=nnx.Param):
  """{path string: numpy copy} of the parameters selected by `wrt`."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, wrt))
  return {jax.tree_util.keystr(p): np.array(x) for p, x in leaves}


def group_of(path: str) -> str:
  if path.startswith("['encoder']"):
    return "encoder"
  if path.startswith("['bridge']") or path.startswith("['llm']['cross_attention']"):
    return "bridge"
  return "llm_lora" if "lora_" in path else "llm"


NAMED_GROUPS = {
    "full": {"encoder", "bridge", "llm", "llm_lora"},
    "lora": {"encoder", "bridge", "llm_lora"},
    "enc": {"encoder", "bridge"},
    "proj": {"bridge"},
}


@pytest.fixture(scope="module")
def all_grads():
  """Gradients of the answer loss w.r.t. every parameter, compiled once for all strategies.

  Each strategy then keeps the part its filter selects, exactly as
  `nnx.grad(..., argnums=nnx.DiffState(0, wrt))` would return it, at a fraction of the
  compile time of one train step per strategy.
  """
  return nnx.jit(lambda model, batch: nnx.grad(lambda m: m.loss(batch)[0])(model))


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_strategy_trains_exactly_its_parameters(strategy, base_model, all_grads):
  model = nnx.clone(base_model)
  wrt = strategies.trainable_filter(strategy)
  trainable_paths = set(flat_params(model, nnx.All(nnx.Param, wrt)))
  assert {group_of(p) for p in trainable_paths} == NAMED_GROUPS[strategy]
  before = flat_params(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
  update = nnx.jit(lambda opt, m, g: opt.update(m, g))  # one compile, not one per leaf op
  batch = make_batch()

  # Two steps: LoRA's A factor only gets a gradient once B has left zero.
  touched = set()
  for _ in range(2):
    grads = nnx.filter_state(all_grads(model, batch), wrt)
    update(optimizer, model, grads)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      assert jax.tree_util.keystr(path) in trainable_paths
      assert np.isfinite(np.asarray(g)).all()
      if np.any(np.asarray(g) != 0):
        touched.add(jax.tree_util.keystr(path))
  after = flat_params(model)
  assert before.keys() == after.keys()
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  frozen = set(before) - trainable_paths
  assert not changed & frozen, f"{strategy}: frozen params moved: {sorted(changed & frozen)}"
  # Adam moves a trainable parameter exactly when it saw a gradient...
  assert changed == touched
  # ...and only the encoder's pretraining heads (unused by the LLM loss) never do.
  idle = trainable_paths - changed
  assert all(any(h in p for h in PRETRAIN_HEADS) for p in idle), sorted(idle)
  assert {group_of(p) for p in changed} == NAMED_GROUPS[strategy]


def test_counts_add_up(base_model):
  groups = strategies.param_groups(base_model)
  assert all(v > 0 for v in groups.values()), groups
  total = sum(groups.values())
  expected = {
      "full": total,
      "lora": groups["encoder"] + groups["bridge"] + groups["llm_lora"],
      "enc": groups["encoder"] + groups["bridge"],
      "proj": groups["bridge"],
  }
  for name, trainable in expected.items():
    assert strategies.trainable_and_total(base_model, name) == (trainable, total)
    assert strategies.check_strategy(base_model, name) == (trainable, total)
    frozen = strategies.trainable_and_total(base_model, strategies.frozen_filter(name))[0]
    assert trainable + frozen == total
    # The optimizer holds moments for exactly the counted parameters.
    opt = nnx.Optimizer(base_model, optax.sgd(0.1, momentum=0.9),
                        wrt=strategies.trainable_filter(name))
    moments = sum(x.size for x in jax.tree.leaves(nnx.state(opt.opt_state)))
    assert moments == trainable, name
  assert groups["llm_lora"] == lora.lora_param_count(base_model.llm)


def test_errors():
  with pytest.raises(ValueError, match="unknown training strategy"):
    strategies.trainable_filter("adapters")
  model = nnx.eval_shape(lambda: ullm.build_user_llm(
      ullm.UserLlmConfig(mode="soft_prompt"), ENCODER_CFG, LLM_CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="LoRA"):
    strategies.check_strategy(model, "lora")
  trainable, total = strategies.check_strategy(model, "proj")
  assert 0 < trainable < total
