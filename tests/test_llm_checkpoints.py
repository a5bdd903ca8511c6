"""Checkpoint import/export on tiny models written in the real formats (GGUF, HF, Orbax)."""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.llm import checkpoint, gguf_loader, safetensors_io
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.loading import load_llm
from user_llm_jax.llm.model import Decoder, decoder_params

TIED = LLM_TINY.replace(tie_embeddings=True, num_layers=2)


def _params(model):
  return {k: np.asarray(v) for k, v in decoder_params(model).items()}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@nnx.jit
def _logits(model, tokens):
  return model(tokens, positions=jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))[0]


TOKENS = jnp.arange(3, 19, dtype=jnp.int32).reshape(2, 8)


@pytest.fixture(scope="module")
def model():
  return Decoder(LLM_TINY, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def ref_logits(model):
  return _logits(model, TOKENS)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  safetensors_io.save_hf_dir(model, d, eos_token_id=2)
  return d


@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  gguf_loader.write_gguf(model, path)
  return path


# ------------------------------------------------------------------ safetensors


def test_hf_export_layout(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert config["num_key_value_heads"] == LLM_TINY.num_kv_heads
  tensors = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  d, n, h = LLM_TINY.width, LLM_TINY.num_heads, LLM_TINY.head_dim
  assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (n * h, d)
  assert tensors["model.layers.3.mlp.down_proj.weight"].shape == (d, LLM_TINY.mlp_dim)
  assert tensors["lm_head.weight"].shape == (LLM_TINY.vocab_size, d)
  assert len(tensors) == 2 + 1 + 9 * LLM_TINY.num_layers


def test_hf_roundtrip_exact(model, hf_dir):
  _assert_same_params(model, safetensors_io.load_hf_dir(hf_dir))


def test_hf_tied_roundtrip_has_no_head(tmp_path):
  tied = Decoder(TIED, rngs=nnx.Rngs(1))
  safetensors_io.save_hf_dir(tied, tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  assert "lm_head.weight" not in tensors
  back = safetensors_io.load_hf_dir(tmp_path)
  assert back.cfg.tie_embeddings
  _assert_same_params(tied, back)


def test_hf_sharded_index(model, hf_dir, tmp_path):
  tensors = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, members in shards.items():
    safetensors.numpy.save_file({k: tensors[k] for k in members}, str(tmp_path / shard))
    weight_map.update({k: shard for k in members})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  _assert_same_params(model, safetensors_io.load_hf_dir(tmp_path))


def test_hf_wrong_shape_names_tensor(hf_dir, tmp_path):
  tensors = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 7), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(5, 7\).*"
                                       r"expected \(128, 64\)"):
    safetensors_io.load_hf_dir(tmp_path)


def test_hf_truncated_and_missing(hf_dir, tmp_path):
  data = (hf_dir / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
    safetensors_io.load_hf_dir(tmp_path)
  config = json.loads((hf_dir / "config.json").read_text())
  del config["hidden_size"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json.*'hidden_size' is missing"):
    safetensors_io.load_hf_dir(tmp_path)


def test_hf_llama3_rope_scaling_config_roundtrip():
  from user_llm_jax.llm.config import LLAMA_3_2_1B  # pylint: disable=g-import-not-at-top
  hf = safetensors_io.config_to_hf(LLAMA_3_2_1B)
  assert hf["rope_scaling"]["rope_type"] == "llama3"
  assert safetensors_io.config_from_hf(hf) == LLAMA_3_2_1B


# ------------------------------------------------------------------ GGUF


def test_gguf_config_from_metadata(gguf_file):
  cfg = gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_file))
  assert cfg == LLM_TINY.replace(max_seq_len=LLM_TINY.max_seq_len)


def test_gguf_f32_roundtrip_exact(model, gguf_file):
  _assert_same_params(model, gguf_loader.load_gguf(gguf_file, progress=False))


def test_gguf_permuted_rows_with_interleaved_rope(gguf_file, ref_logits):
  """Keeping llama.cpp's q/k rows and using interleaved RoPE computes the same function."""
  raw = gguf_loader.load_gguf(gguf_file, unpermute=False, progress=False)
  assert raw.cfg.rope_layout == "interleaved"
  np.testing.assert_allclose(_logits(raw, TOKENS), ref_logits, atol=1e-4)


def test_gguf_quantized_close(model, ref_logits, tmp_path):
  path = tmp_path / "q8.gguf"
  gguf_loader.write_gguf(model, path, qtype=gguf.GGMLQuantizationType.Q8_0)
  types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
  assert gguf.GGMLQuantizationType.Q8_0 in types
  loaded = gguf_loader.load_gguf(path, progress=False)
  err = float(jnp.abs(_logits(loaded, TOKENS) - ref_logits).max())
  assert 0 < err < 0.3  # 8-bit blocks: small but non-zero error


def test_gguf_truncated_names_tensor(gguf_file, tmp_path):
  data = gguf_file.read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:int(len(data) * 0.6)])
  with pytest.raises(ValueError, match=r"cut\.gguf.*tensor 'blk\.\d+\.\w+\.weight'.*truncated"):
    gguf_loader.load_gguf(path, progress=False)


def test_gguf_mismatched_config_names_tensor(gguf_file):
  with pytest.raises(ValueError, match=r"tiny\.gguf: tensor 'model\.layers\.0\.mlp\.\w+_proj"
                                       r"\.weight' has shape .* expected"):
    gguf_loader.load_gguf(gguf_file, LLM_TINY.replace(mlp_dim=96), progress=False)


# ------------------------------------------------------------------ Orbax + load_llm


def test_orbax_roundtrip_and_mesh_restore(model, tmp_path, ref_logits):
  checkpoint.save_decoder(model, tmp_path / "ckpt")
  assert checkpoint.is_checkpoint_dir(tmp_path / "ckpt")
  _assert_same_params(model, checkpoint.restore_decoder(tmp_path / "ckpt"))
  mesh = sharding.make_mesh((1, 2, 4))
  sharded = checkpoint.restore_decoder(tmp_path / "ckpt", mesh=mesh)
  assert sharded.embedder.embedding[...].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", "fsdp")
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(_logits(sharded, TOKENS), ref_logits, atol=1e-5)


def test_orbax_missing_dir_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="llm_config.json missing"):
    checkpoint.restore_decoder(tmp_path)


def test_load_llm_dispatch_and_cache(model, hf_dir, gguf_file, tmp_path):
  for source in (str(hf_dir), str(gguf_file)):
    loaded = load_llm(source)
    _assert_same_params(model, loaded.model)
  cache = tmp_path / "cache"
  first = load_llm(str(gguf_file), cache_dir=cache)
  assert checkpoint.is_checkpoint_dir(cache)
  second = load_llm(str(gguf_file), cache_dir=cache)  # restored from Orbax, not the GGUF
  _assert_same_params(first.model, second.model)
  _assert_same_params(model, load_llm(str(cache)).model)
  # The cache remembers its source: another source replaces it instead of being shadowed.
  other = tmp_path / "tied_hf"
  safetensors_io.save_hf_dir(Decoder(TIED, rngs=nnx.Rngs(2)), other)
  assert load_llm(str(other), cache_dir=cache).model.cfg == TIED
  assert load_llm(str(other), cache_dir=cache).model.cfg == TIED
  assert checkpoint.read_config(cache) == TIED
  rand = load_llm("random", "tiny", seed=3)
  assert rand.tokenizer is None and rand.model.cfg == LLM_TINY
  with pytest.raises(FileNotFoundError, match="neither 'smollm2'"):
    load_llm(str(tmp_path / "nope"))


def test_hf_bfloat16_checkpoint(model, hf_dir, tmp_path):
  """Published checkpoints are often bfloat16: they load as float32 params."""
  import safetensors.flax  # pylint: disable=g-import-not-at-top
  tensors = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  safetensors.flax.save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()},
                             str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  loaded = safetensors_io.load_hf_dir(tmp_path)
  q = np.asarray(loaded.layers[0].attn.q.kernel[...])
  assert q.dtype == np.float32
  expected = np.asarray(jnp.asarray(model.layers[0].attn.q.kernel[...], jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(q, expected)


def test_load_llm_onto_mesh(model, gguf_file, hf_dir, ref_logits):
  """Imported parameters go straight to their sharded placement; logits are unchanged."""
  mesh = sharding.make_mesh((1, 2, 4))
  for source in (str(gguf_file), str(hf_dir)):
    loaded = load_llm(source, mesh=mesh).model
    kernel = loaded.layers[1].mlp.down.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    with jax.set_mesh(mesh):
      np.testing.assert_allclose(_logits(loaded, TOKENS), ref_logits, atol=1e-5)
  # Sharded random init: same seed, same values (up to float rounding of the sharded init).
  rand = _params(load_llm("random", LLM_TINY, seed=7, mesh=mesh).model)
  for key, value in _params(model).items():
    np.testing.assert_allclose(rand[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
