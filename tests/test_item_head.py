"""The item head ranks the whole catalogue from the LLM state at the prompt's last token:
its scores equal a brute-force computation, PAD and OOV are never ranked, and the reported
Recall@K / NDCG@10 equal ranks computed by sorting the brute-force scores."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax.bridge import strategies
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.data import schema
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.eval import retrieval
from user_llm_jax.llm import lora
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

B, T = 6, 12
E = ENCODER_TINY.max_len
V = ENCODER_TINY.num_items


@pytest.fixture(scope="module")
def model():
  with nnx.use_eager_sharding(False):
    m = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=1, item_head=True),
                     encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)),
                     llm=Decoder(LLM_TINY.replace(num_layers=2), rngs=nnx.Rngs(0)),
                     rngs=nnx.Rngs(2))
  for block in m.llm.cross_attention.values():  # the user context reaches the state
    block.attn_gate[...] = jnp.asarray(0.5)
    block.mlp_gate[...] = jnp.asarray(0.5)
  head = m.item_head
  # The reserved ids get the largest biases: only the masking keeps them out of the ranking.
  bias = np.asarray(head.bias[...]).copy()
  bias[:schema.FIRST_ID] = 1e6
  head.bias[...] = jnp.asarray(bias)
  return m


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  n = rng.integers(2, E + 1, size=B)
  mask = np.arange(E)[None] < n[:, None]

  def ids(high, shape):
    m = mask.reshape(mask.shape + (1,) * (len(shape) - 2))
    return np.where(m, rng.integers(2, high, shape), 0).astype(np.int32)

  prompt_length = rng.integers(4, T - 2, size=B).astype(np.int32)
  targets = ids(V, (B, E))
  targets[0, n[0] - 1] = schema.OOV_ID  # an unknown target can only be a miss
  return {
      "inputs_item": ids(V, (B, E)), "inputs_rating": ids(ENCODER_TINY.num_ratings, (B, E)),
      "inputs_category": ids(ENCODER_TINY.num_categories, (B, E, 3)),
      "inputs_time": ids(ENCODER_TINY.num_time_buckets, (B, E)), "mask": mask,
      "targets_item": targets, "last_index": (n - 1).astype(np.int32),
      "tokens": rng.integers(0, LLM_TINY.vocab_size, (B, T)).astype(np.int32),
      "text_mask": np.ones((B, T), bool), "prompt_length": prompt_length,
  }


def brute_force_scores(model, batch):
  """Item scores from the LLM states, one example and one item at a time (float64)."""
  hidden = np.asarray(model.hidden_states(batch, jnp.asarray(batch["tokens"])), np.float64)
  kernel = np.asarray(model.item_head.query.kernel[...], np.float64)      # [D, F]
  items = np.asarray(model.item_head.items[...], np.float64)              # [V, F]
  bias = np.asarray(model.item_head.bias[...], np.float64)
  out = np.full((B, V), -np.inf)
  for b in range(B):
    q = hidden[b, int(batch["prompt_length"][b]) - 1] @ kernel
    for v in range(schema.FIRST_ID, V):
      out[b, v] = float(items[v] @ q) + bias[v]
  return out


def test_scores_match_brute_force_and_exclude_pad_and_oov(model):
  batch = make_batch()
  scores = np.asarray(model.next_item_logits(batch))
  assert scores.shape == (B, V)
  assert np.isneginf(scores[:, :schema.FIRST_ID]).all()
  assert np.isfinite(scores[:, schema.FIRST_ID:]).all()
  np.testing.assert_allclose(scores[:, schema.FIRST_ID:],
                             brute_force_scores(model, batch)[:, schema.FIRST_ID:],
                             rtol=1e-4, atol=1e-4)
  # Only the prompt is read: what follows it (the answer slots) changes nothing.
  later = dict(batch, tokens=batch["tokens"].copy())
  for b in range(B):
    later["tokens"][b, batch["prompt_length"][b]:] = 7
  np.testing.assert_array_equal(np.asarray(model.next_item_logits(later)), scores)
  # And it reads the user: another user's events change the scores.
  other = make_batch(seed=3)
  moved = dict(batch, **{k: other[k] for k in ("inputs_item", "inputs_rating",
                                               "inputs_category", "inputs_time", "mask")})
  assert not np.allclose(np.asarray(model.next_item_logits(moved)), scores)


def test_reported_metrics_equal_a_sort_of_the_brute_force_scores(model):
  batches = [make_batch(seed) for seed in (0, 1)]
  got = retrieval.evaluate_next_item(model, batches, ks=(1, 5, 10))
  ranks = []
  for batch in batches:
    scores = brute_force_scores(model, batch)
    targets = retrieval.last_targets(batch)
    for b in range(B):
      target = int(targets[b])
      if target < schema.FIRST_ID:
        ranks.append(np.inf)  # PAD / OOV targets are never found
        continue
      # Every catalogue item but PAD and OOV, best first; ties by smaller id.
      order = sorted(range(schema.FIRST_ID, V), key=lambda v: (-scores[b, v], v))
      ranks.append(order.index(target))
  ranks = np.asarray(ranks)
  assert got["num_examples"] == 2 * B
  for k in (1, 5, 10):
    assert got[f"recall@{k}"] == pytest.approx(np.mean(ranks < k))
  ndcg = np.where(ranks < 10, 1.0 / np.log2(np.minimum(ranks, 1e9) + 2.0), 0.0)
  assert got["ndcg@10"] == pytest.approx(np.mean(ndcg))
  # Some target was ranked and some was not in the top 1, so the check has teeth.
  assert np.isfinite(ranks).sum() == 2 * B - 2 and (ranks[np.isfinite(ranks)] > 0).any()


@pytest.fixture(scope="module")
def skip_model():
  with nnx.use_eager_sharding(False):
    m = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=1, item_head=True,
                                        item_head_skip=True),
                     encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)),
                     llm=Decoder(LLM_TINY.replace(num_layers=2), rngs=nnx.Rngs(0)),
                     rngs=nnx.Rngs(2))
  for block in m.llm.cross_attention.values():
    block.attn_gate[...] = jnp.asarray(0.5)
    block.mlp_gate[...] = jnp.asarray(0.5)
  return m


def test_encoder_skip_starts_as_the_encoders_own_head(skip_model):
  batch = make_batch()
  assert not np.asarray(skip_model.item_head.query.kernel[...]).any()
  np.testing.assert_array_equal(np.asarray(skip_model.next_item_logits(batch)),
                                np.asarray(skip_model.encoder.next_item_logits(batch)))


def test_encoder_skip_carries_the_encoders_repeat_bias():
  # An encoder with a learned repeat bias: the skip adds its full next-item scores, the
  # bias on the items the user's events hold included, not the head's dot products alone.
  with nnx.use_eager_sharding(False):
    m = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=1, item_head=True,
                                        item_head_skip=True),
                     encoder=UserEncoder(ENCODER_TINY.replace(repeat_bias=True),
                                         rngs=nnx.Rngs(1)),
                     llm=Decoder(LLM_TINY.replace(num_layers=2), rngs=nnx.Rngs(0)),
                     rngs=nnx.Rngs(2))
  m.encoder.repeat_bias[...] = jnp.asarray(-3.0)
  batch = make_batch()
  got = np.asarray(m.next_item_logits(batch))
  np.testing.assert_array_equal(got, np.asarray(m.encoder.next_item_logits(batch)))
  m.encoder.repeat_bias[...] = jnp.asarray(0.0)
  plain = np.asarray(m.next_item_logits(batch))
  moved = np.isfinite(plain) & (got != plain)
  assert moved.any()
  np.testing.assert_allclose((got - plain)[moved], -3.0, rtol=1e-5)


def test_encoder_skip_adds_the_llm_part_and_trains_it(skip_model):
  batch = make_batch()
  model = nnx.clone(skip_model)
  rng = np.random.default_rng(0)
  model.item_head.query.kernel[...] = jnp.asarray(
      rng.normal(0, 0.1, model.item_head.query.kernel.shape), jnp.float32)
  # Scores = the LLM part (brute force over the LLM states) + the encoder's own head.
  want = brute_force_scores(model, batch) + np.asarray(
      model.encoder.next_item_logits(batch), np.float64)
  got = np.asarray(model.next_item_logits(batch))
  assert np.isneginf(got[:, :schema.FIRST_ID]).all()
  np.testing.assert_allclose(got[:, schema.FIRST_ID:], want[:, schema.FIRST_ID:],
                             rtol=1e-4, atol=1e-4)
  # From the zero start the item loss reaches the LLM part's projection (it can learn) and
  # the encoder's head, and the loss's item term is the softmax over the summed scores.
  batch["loss_mask"] = np.zeros((B, T), bool)
  grads = nnx.grad(lambda m: m.loss(batch)[0])(skip_model)
  assert np.abs(np.asarray(grads.item_head.query.kernel[...])).max() > 0
  assert np.abs(np.asarray(grads.encoder.item_query.kernel[...])).max() > 0
  _, metrics = skip_model.loss(batch)
  scores = np.asarray(skip_model.encoder.next_item_logits(batch), np.float64)
  targets = retrieval.last_targets(batch)
  valid = targets >= schema.FIRST_ID
  finite = np.where(np.isneginf(scores), -np.inf, scores)
  logz = np.log(np.exp(finite - finite.max(1, keepdims=True)).sum(1)) + finite.max(1)
  nll = logz - scores[np.arange(B), np.where(valid, targets, schema.FIRST_ID)]
  assert float(metrics["item_loss"]) == pytest.approx(nll[valid].mean(), rel=1e-4)


def test_encoder_skip_needs_the_item_head():
  with pytest.raises(ValueError, match="item_head_skip=True needs item_head=True"):
    ullm.UserLlmConfig(item_head_skip=True)


def test_frozen_skip_needs_the_skip():
  with pytest.raises(ValueError, match="item_head_skip_frozen=True needs item_head_skip"):
    ullm.UserLlmConfig(item_head=True, item_head_skip_frozen=True)


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_frozen_skip_keeps_the_starting_encoders_ranking(strategy):
  """The frozen skip reads the encoder as the model was built: no strategy trains its copy,
  and a step that moves the trained encoder moves the item head by the LLM's part alone."""
  with nnx.use_eager_sharding(False):
    llm = Decoder(LLM_TINY.replace(num_layers=2), rngs=nnx.Rngs(0))
    if strategy == "lora":
      lora.apply_lora(llm, lora.LoraConfig(rank=2, targets=("q", "v")), rngs=nnx.Rngs(4))
    m = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=1, item_head=True,
                                        item_head_skip=True, item_head_skip_frozen=True),
                     encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)), llm=llm,
                     rngs=nnx.Rngs(2))
  for block in m.llm.cross_attention.values():  # the LLM loss reaches the encoder
    block.attn_gate[...] = jnp.asarray(0.5)
    block.mlp_gate[...] = jnp.asarray(0.5)
  batch = make_batch()
  start = np.asarray(m.encoder.next_item_logits(batch))
  np.testing.assert_array_equal(np.asarray(m.next_item_logits(batch)), start)
  trainable, total = strategies.check_strategy(m, strategy)
  groups = strategies.param_groups(m)
  assert groups["skip_encoder"] == groups["encoder"] > 0
  assert trainable <= total - groups["skip_encoder"]
  # One optimizer step on the loss (the item term included) under the strategy.
  batch["loss_mask"] = np.ones((B, T), bool)
  wrt = strategies.trainable_filter(strategy)
  opt = nnx.Optimizer(m, optax.sgd(1.0), wrt=wrt)
  grads = nnx.grad(lambda mod: mod.loss(batch)[0], argnums=nnx.DiffState(0, wrt))(m)
  frozen_before = jax.tree.map(np.asarray, nnx.state(m.skip_encoder, nnx.Param))
  opt.update(m, grads)
  frozen_after = jax.tree.map(np.asarray, nnx.state(m.skip_encoder, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, frozen_before, frozen_after)
  np.testing.assert_array_equal(np.asarray(m.skip_encoder.next_item_logits(batch)), start)
  # With the LLM's part set to 0 again, the head is exactly the starting encoder's ranking,
  # whatever the step did to the trained encoder (Enc and Full move it: the check has teeth).
  m.item_head.query.kernel[...] = jnp.zeros_like(m.item_head.query.kernel[...])
  m.item_head.bias[...] = jnp.zeros_like(m.item_head.bias[...])
  np.testing.assert_array_equal(np.asarray(m.next_item_logits(batch)), start)
  if strategy in ("enc", "full", "lora"):
    assert not np.array_equal(np.asarray(m.encoder.next_item_logits(batch)), start)
