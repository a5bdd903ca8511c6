"""LoRA adapters: identity at init, only adapters train under the filter, merge is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax.llm import safetensors_io
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.lora import (LoraConfig, LoraEinsum, LoraParam, apply_lora,
                                   lora_param_count, merge_lora)
from user_llm_jax.llm.model import Decoder, decoder_params

TOKENS = jnp.arange(5, 21, dtype=jnp.int32).reshape(2, 8)
POS = jnp.broadcast_to(jnp.arange(8), (2, 8))
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))


@nnx.jit
def _logits(model):
  return model(TOKENS, positions=POS)[0]


def _loss(model):
  logits = model(TOKENS[:, :-1], positions=POS[:, :-1])[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()


@nnx.jit
def _train_step(model, optimizer):
  loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, LoraParam))(model)
  optimizer.update(model, grads)
  return loss


@pytest.fixture(scope="module")
def trained():
  """(base logits, frozen base params, LoRA model after 3 Adam steps on the adapters only)."""
  model = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  base_logits = _logits(model)
  base_params = {k: np.array(v) for k, v in decoder_params(model).items()}
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  init_logits = _logits(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoraParam)
  losses = [float(_train_step(model, optimizer)) for _ in range(3)]
  return base_logits, base_params, init_logits, losses, model


def test_adapters_wrap_targets_with_zero_b():
  model = apply_lora(Decoder(LLM_TINY, rngs=nnx.Rngs(0)),
                     LoraConfig(rank=2, targets=("q", "down"), layers=(1, 3)), rngs=nnx.Rngs(1))
  assert isinstance(model.layers[1].attn.q, LoraEinsum)
  assert isinstance(model.layers[3].mlp.down, LoraEinsum)
  assert not isinstance(model.layers[0].attn.q, LoraEinsum)
  assert not isinstance(model.layers[1].attn.k, LoraEinsum)
  q = model.layers[1].attn.q
  d, n, h = LLM_TINY.width, LLM_TINY.num_heads, LLM_TINY.head_dim
  assert q.lora_a[...].shape == (d, 2) and q.lora_b[...].shape == (2, n, h)
  assert not np.any(np.asarray(q.lora_b[...]))
  assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
  assert lora_param_count(model) == 2 * (d * 2 + 2 * n * h + LLM_TINY.mlp_dim * 2 + 2 * d)


def test_identity_at_init(trained):
  base_logits, _, init_logits, _, _ = trained
  np.testing.assert_array_equal(init_logits, base_logits)


def test_only_adapters_train(trained):
  _, base_params, _, losses, model = trained
  assert losses[-1] < losses[0]
  params = {k: np.asarray(v) for k, v in decoder_params(model).items()}
  for key, value in base_params.items():
    wrapped = key.replace("/kernel", "/base/kernel")
    np.testing.assert_array_equal(params.get(key, params.get(wrapped)), value, err_msg=key)
  b = np.asarray(model.layers[0].attn.q.lora_b[...])
  assert np.abs(b).max() > 0


def test_merge_matches_adapters_and_exports(trained, tmp_path):
  _, _, _, _, model = trained
  before = _logits(model)
  with pytest.raises(ValueError, match="merge LoRA adapters before export"):
    safetensors_io.save_hf_dir(model, tmp_path)
  merged = merge_lora(nnx.clone(model))
  assert lora_param_count(merged) == 0
  assert not isinstance(merged.layers[0].attn.q, LoraEinsum)
  np.testing.assert_allclose(_logits(merged), before, atol=1e-4)
  safetensors_io.save_hf_dir(merged, tmp_path)
  reloaded = safetensors_io.load_hf_dir(tmp_path)
  np.testing.assert_allclose(_logits(reloaded), before, atol=1e-4)


def test_bad_config():
  with pytest.raises(ValueError, match="unknown \\['qkv'\\]"):
    LoraConfig(targets=("qkv",))
  with pytest.raises(ValueError, match="rank must be positive"):
    LoraConfig(rank=0)
  model = apply_lora(Decoder(LLM_TINY, rngs=nnx.Rngs(0)), LoraConfig(), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
