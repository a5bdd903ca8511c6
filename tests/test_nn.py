"""The shared primitives: masked attention, parameter names and counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import nn
from user_llm_jax import params
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

B, T, S, H = 2, 5, 7, 8


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _reference(q, k, v, mask):
  """The decoder's former attention: float32 logits, finfo.min floor, GQA by reshaping."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None], logits / math.sqrt(h), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_attention_matches_the_former_implementations(heads, kv_heads):
  q = _normal(0, (B, T, heads, H))
  k, v = _normal(1, (B, S, kv_heads, H)), _normal(2, (B, S, kv_heads, H))
  mask = jax.random.bernoulli(jax.random.key(3), 0.6, (B, T, S)).at[:, :, 0].set(True)
  out = jax.jit(nn.attention)(q, k, v, mask)
  assert out.shape == (B, T, heads, H) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
  # Masked keys get exactly zero weight: their values cannot leak in.
  v_noise = jnp.where(mask.any(1)[:, :, None, None], v, 1e4)
  np.testing.assert_allclose(jax.jit(nn.attention)(q, k, v_noise, mask), out, atol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q, k, v = _normal(0, (B, T, 4, H)), _normal(1, (B, S, 2, H)), _normal(2, (B, S, 2, H))
  mask = jnp.ones((B, T, S), bool).at[1, 2].set(False).at[0].set(False)
  out = nn.attention(q, k, v, mask)
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[1, 2], 0.0)
  assert np.abs(out[1, 3]).max() > 0
  grads = jax.grad(lambda q, k, v: nn.attention(q, k, v, mask).sum(), argnums=(0, 1, 2))(
      q, k, v)
  for g in grads:
    assert np.isfinite(g).all()
  np.testing.assert_array_equal(grads[0][0], 0.0)


def test_attention_key_mask_broadcasts_and_keeps_the_compute_dtype():
  q = _normal(0, (B, T, 4, H), jnp.bfloat16)
  k, v = _normal(1, (B, S, 4, H)), _normal(2, (B, S, 4, H))  # a float32 cache
  kv_mask = jnp.array([[True] * S, [True] * 3 + [False] * (S - 3)])
  out = nn.attention(q, k, v, kv_mask[:, None, :])
  assert out.dtype == jnp.bfloat16
  full = nn.attention(q, k, v, jnp.broadcast_to(kv_mask[:, None, :], (B, T, S)))
  np.testing.assert_array_equal(out, full)
  with pytest.raises(ValueError, match="not a multiple"):
    nn.attention(_normal(0, (B, T, 3, H)), k[:, :, :2], v[:, :, :2], kv_mask[:, None, :])


def test_param_path_and_count_params():
  model = nnx.eval_shape(lambda: Decoder(LLM_TINY, rngs=nnx.Rngs(0)))
  names = [params.param_path(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert "layers/0/attn/q/kernel" in names and "embedder/embedding" in names
  assert params.param_path((jax.tree_util.DictKey("llm"),
                            jax.tree_util.GetAttrKey("cross_attention"),
                            jax.tree_util.SequenceKey(0), jax.tree_util.DictKey("attn_gate"),
                            jax.tree_util.GetAttrKey("value"))) == "llm/cross_attention/0/attn_gate"
  c, d = LLM_TINY, LLM_TINY.width
  layer = (2 * d + d * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * d * c.mlp_dim)
  head = 0 if c.tie_embeddings else d * c.vocab_size
  expected = c.vocab_size * d + c.num_layers * layer + d + head
  assert params.count_params(model) == expected
  assert params.count_params(model, nnx.RngState) == 0
