"""Bridge building blocks: projection, Perceiver resampler, gated cross-attention, soft prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import nn
from user_llm_jax import sharding
from user_llm_jax.bridge import cross_attention as xattn
from user_llm_jax.bridge import soft_prompt
from user_llm_jax.bridge.perceiver import PerceiverResampler
from user_llm_jax.bridge.projection import Projection
from user_llm_jax.llm import losses
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

B, T, E, D, C = 2, 6, 7, 64, 32
# Row 0 has all 7 events, row 1 only the first 3 (the rest is padding).
EVENT_MASK = jnp.array([[True] * 7, [True] * 3 + [False] * 4])


# Jitted entry points: one compile per shape instead of one per eager op.
apply = nnx.jit(lambda module, *args: module(*args))
# Cross-attention's use of the shared attention: no causal mask, [B,S] key mask, q pre-scaled.
masked_attention = jax.jit(lambda q, k, v, kv_mask: nn.attention(q, k, v, kv_mask[:, None, :],
                                                                 scale=1.0))
merge_soft_prompt = jax.jit(soft_prompt.merge_soft_prompt)
next_token_loss = jax.jit(losses.next_token_loss)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _scramble_padding(context, mask, seed=99):
  """Replaces padded user embeddings by large unrelated values."""
  noise = 100.0 * _normal(seed, context.shape)
  return jnp.where(mask[..., None], context, noise)


@pytest.fixture(scope="module")
def block():
  # Non-zero gates so that the block actually changes its input.
  return xattn.GatedCrossAttention(D, context_width=C, num_heads=4, head_dim=16, mlp_dim=128,
                                   gate_init=0.7, rngs=nnx.Rngs(0))


def test_projection_shapes_and_layers():
  x = _normal(0, (B, E, C))
  for layers in (1, 2, 3):
    proj = Projection(C, D, num_layers=layers, hidden_dim=48, rngs=nnx.Rngs(1))
    assert len(proj.kernels) == layers
    assert proj(x).shape == (B, E, D)
  # Two layers with GELU are not affine: f(a + b) != f(a) + f(b) - f(0).
  proj = Projection(C, D, rngs=nnx.Rngs(1))
  a, b = x[:, :1], x[:, 1:2]
  zero = jnp.zeros_like(a)
  assert not np.allclose(proj(a + b), proj(a) + proj(b) - proj(zero), atol=1e-4)
  with pytest.raises(ValueError, match="num_layers"):
    Projection(C, D, num_layers=0, rngs=nnx.Rngs(1))


def test_masked_attention_ignores_padding_and_empty_rows_are_zero():
  q = _normal(0, (B, T, 2, 8))
  k = _normal(1, (B, E, 2, 8))
  v = _normal(2, (B, E, 2, 8))
  out = masked_attention(q, k, v, EVENT_MASK)
  mask = EVENT_MASK
  k2 = jnp.where(mask[..., None, None], k, 1e4)
  v2 = jnp.where(mask[..., None, None], v, -1e4)
  np.testing.assert_array_equal(out, masked_attention(q, k2, v2, mask))
  # Reference: softmax restricted to the valid keys of row 1.
  logits = jnp.einsum("TNH,SNH->NTS", q[1], k[1, :3])
  ref = jnp.einsum("NTS,SNH->TNH", jax.nn.softmax(logits, -1), v[1, :3])
  np.testing.assert_allclose(out[1], ref, rtol=1e-5, atol=1e-5)
  # No valid key at all: zero output, finite gradients.
  none = jnp.zeros((B, E), bool)
  np.testing.assert_array_equal(masked_attention(q, k, v, none), 0.0)
  g = jax.grad(lambda q: masked_attention(q, k, v, none).sum())(q)
  assert np.isfinite(g).all()


def test_gated_block_masks_padding(block):
  x = _normal(3, (B, T, D))
  ctx = _normal(4, (B, E, C))
  y = apply(block, x, ctx, EVENT_MASK)
  assert y.shape == (B, T, D)
  assert float(jnp.abs(y - x).max()) > 1e-3  # gates are open: the block does something
  np.testing.assert_array_equal(y, apply(block, x, _scramble_padding(ctx, EVENT_MASK), EVENT_MASK))
  # Text tokens see every valid event (no causal mask): changing the *last* valid event
  # changes the output of the *first* text token.
  ctx_changed = ctx.at[1, 2].add(_normal(12, (C,)))
  assert not np.allclose(apply(block, x, ctx_changed, EVENT_MASK)[1, 0], y[1, 0])
  # Examples do not see each other's user embeddings.
  other = ctx.at[0].add(_normal(13, (E, C)))
  np.testing.assert_array_equal(apply(block, x, other, EVENT_MASK)[1], y[1])


def test_gated_block_zero_gates_is_identity():
  blk = xattn.GatedCrossAttention(D, context_width=C, num_heads=4, head_dim=16, mlp_dim=128,
                                  rngs=nnx.Rngs(0))
  assert float(blk.attn_gate[...]) == 0.0 and float(blk.mlp_gate[...]) == 0.0
  x = _normal(3, (B, T, D))
  np.testing.assert_array_equal(blk(x, _normal(4, (B, E, C)), EVENT_MASK), x)


def test_gated_block_rejects_mismatched_context(block):
  with pytest.raises(ValueError, match="context_mask"):
    block(_normal(3, (B, T, D)), _normal(4, (B, E, C)), EVENT_MASK[:, :3])


def test_perceiver_shapes_masking_and_empty_history():
  perceiver = PerceiverResampler(D, num_latents=4, num_layers=2, num_heads=4,
                                 rngs=nnx.Rngs(2))
  assert len(perceiver.layers) == 2
  events = _normal(5, (B, E, D))
  out = apply(perceiver, events, EVENT_MASK)
  assert out.shape == (B, 4, D)
  np.testing.assert_array_equal(
      out, apply(perceiver, _scramble_padding(events, EVENT_MASK), EVENT_MASK))
  # Every latent depends on the history (a real event changes all of them).
  changed = apply(perceiver, events.at[1, 0].add(_normal(12, (D,))), EVENT_MASK)
  assert (jnp.abs(changed[1] - out[1]).max(axis=-1) > 1e-6).all()
  empty = apply(perceiver, events, jnp.zeros((B, E), bool))
  assert np.isfinite(empty).all()
  # Output length is independent of the history length.
  long_events = _normal(6, (B, 50, D))
  shape = jax.eval_shape(perceiver, long_events, jnp.ones((B, 50), bool))
  assert shape.shape == (B, 4, D)
  with pytest.raises(ValueError, match="event_mask"):
    perceiver(events, EVENT_MASK[:, :2])


def test_every_bridge_param_has_logical_axes():
  modules = [
      Projection(C, D, rngs=nnx.Rngs(0)),
      PerceiverResampler(D, num_latents=4, rngs=nnx.Rngs(0)),
      xattn.GatedCrossAttention(D, num_heads=4, head_dim=16, mlp_dim=128, rngs=nnx.Rngs(0)),
  ]
  rule_names = {name for name, _ in sharding.DEFAULT_RULES
                if not name.startswith("activation_")}
  for module in modules:
    for path, var in nnx.iter_graph(module):
      if isinstance(var, nnx.Param):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert set(names) <= rule_names, (path, names)


def test_soft_prompt_merge_positions_and_mask():
  soft = _normal(7, (B, 3, D))
  soft_mask = jnp.array([[True, True, True], [False, True, True]])
  tokens = _normal(8, (B, 4, D))
  text_mask = jnp.array([[True] * 4, [True, True, True, False]])
  embeds, mask, pos = merge_soft_prompt(soft, soft_mask, tokens, text_mask)
  assert embeds.shape == (B, 7, D) and mask.shape == (B, 7, 7) and pos.shape == (B, 7)
  np.testing.assert_array_equal(embeds[:, :3], soft)
  np.testing.assert_array_equal(embeds[:, 3:], tokens)
  np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 4]])
  # Row 1: the padded soft slot 0 is never a key except for itself.
  assert not mask[1, 1:, 0].any() and mask[1, 0, 0]
  # Causal over the merged sequence; text sees all valid soft slots.
  assert mask[0, 3, :4].all() and not mask[0, 3, 4:].any()
  assert mask[1, 5, 1:6].all() and not mask[1, 5, 6]
  # A custom text-to-text mask lands in the text block.
  full = jnp.ones((B, 4, 4), bool)
  _, mask2, _ = merge_soft_prompt(soft, soft_mask, tokens, text_mask, full)
  assert mask2[0, 3, 6] and not mask2[1, 3, 6]  # padded text key stays masked
  with pytest.raises(ValueError, match="share"):
    merge_soft_prompt(soft[:1], None, tokens)


def test_answer_loss_mask_and_prepend():
  m = soft_prompt.answer_loss_mask(jnp.array([2, 4]), jnp.array([3, 0]), 6)
  np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 0], [0] * 6])
  p = soft_prompt.prepend_loss_mask(m, 2)
  assert p.shape == (2, 8) and not p[:, :2].any()
  np.testing.assert_array_equal(p[:, 2:], m)


def test_next_token_loss_counts_answer_tokens_only():
  # Still importable from its former home while callers move to llm.losses.
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
  mask = jnp.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], bool)
  loss, count = next_token_loss(logits, tokens, mask)
  logp = jax.nn.log_softmax(np.asarray(logits), -1)
  ref = -(logp[0, 1, tokens[0, 2]] + logp[0, 2, tokens[0, 3]] + logp[1, 2, tokens[1, 3]]) / 3
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  assert int(count) == 3
  # Non-answer logits do not matter.
  other = logits.at[:, 3:].set(123.0).at[:, 0].set(-7.0)
  np.testing.assert_allclose(next_token_loss(other, tokens, mask)[0], loss,
                             rtol=1e-6)
  # Everything masked: exactly 0, zero (finite) gradients.
  none = jnp.zeros_like(mask)
  val, grad = jax.value_and_grad(lambda l: next_token_loss(l, tokens, none)[0])(
      logits)
  assert float(val) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


@nnx.jit
def run_decoder(decoder, tokens, positions, context, context_mask):
  return decoder(tokens, positions=positions, context=context, context_mask=context_mask)


@pytest.fixture(scope="module")
def decoder_pair():
  """A tiny decoder and a copy with cross-attention blocks every 2 layers (zero gates)."""
  plain = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  with_x = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  layers = xattn.insert_cross_attention(with_x, every_k=2, context_width=C, rngs=nnx.Rngs(5))
  return plain, with_x, layers


def test_insert_cross_attention_layout(decoder_pair):
  _, dec, layers = decoder_pair
  assert layers == (0, 2)
  assert sorted(dec.cross_attention.keys()) == ["0", "2"]
  assert xattn.cross_attention_layers(30, 5) == (0, 5, 10, 15, 20, 25)
  assert xattn.cross_attention_layers(4, 1) == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="already"):
    xattn.insert_cross_attention(dec, every_k=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="every_k"):
    xattn.cross_attention_layers(4, 0)


def test_zero_gate_decoder_logits_bit_identical(decoder_pair):
  plain, dec, _ = decoder_pair
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, LLM_TINY.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  ctx = _normal(11, (B, E, C))
  ref, _ = nnx.jit(lambda m: m(tokens, positions=pos))(plain)
  out, _ = run_decoder(dec, tokens, pos, ctx, EVENT_MASK)
  assert float(jnp.abs(out - ref).max()) == 0.0
  np.testing.assert_array_equal(out, ref)


def test_decoder_with_open_gates_uses_context_but_not_padding(decoder_pair):
  _, dec, _ = decoder_pair
  opened = nnx.clone(dec)
  for blk in opened.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(0.5)
    blk.mlp_gate[...] = jnp.asarray(0.5)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, LLM_TINY.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  ctx = _normal(11, (B, E, C))
  out, _ = run_decoder(opened, tokens, pos, ctx, EVENT_MASK)
  ref, _ = run_decoder(dec, tokens, pos, ctx, EVENT_MASK)
  assert float(jnp.abs(out - ref).max()) > 1e-4
  out2, _ = run_decoder(opened, tokens, pos, _scramble_padding(ctx, EVENT_MASK), EVENT_MASK)
  np.testing.assert_array_equal(out, out2)
