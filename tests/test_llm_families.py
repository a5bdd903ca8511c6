"""Qwen2.5, Qwen3, Gemma 2 and Gemma 3 decoders: parity with transformers, KV-cache decoding,
sliding windows, presets and their Hugging Face configs and checkpoints."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from experiments import hf_parity
from user_llm_jax.llm import checkpoint, safetensors_io, sampler
from user_llm_jax.llm.config import LlmConfig, get_preset
from user_llm_jax.llm.layers import Attention, sliding_window_mask
from user_llm_jax.llm.model import Decoder, decoder_from_params, decoder_params
from user_llm_jax.params import count_params

TINY = ("tiny_qwen2", "tiny_qwen3", "tiny_gemma2", "tiny_gemma3")
FAMILY = {"tiny_qwen2": "qwen2", "tiny_qwen3": "qwen3", "tiny_gemma2": "gemma2",
          "tiny_gemma3": "gemma3_text"}
PRESETS = ("qwen2_5_0_5b", "qwen3_0_6b", "gemma2_2b", "gemma3_270m", "gemma3_1b")
PARITY_TOLERANCE = 1e-4

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="PyTorch and transformers not installed (pip install -e .[parity])")


def _tiny(name: str, seed: int = 0) -> Decoder:
  return hf_parity.randomize_small_params(Decoder(get_preset(name), rngs=nnx.Rngs(seed)), seed)


def _forward(model: Decoder, tokens: np.ndarray) -> np.ndarray:
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return np.asarray(model(jnp.asarray(tokens), positions=positions)[0])


# ------------------------------------------------------------------ transformers parity

@pytest.mark.torch
@needs_torch
@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(name, tmp_path):
  model, tokens = hf_parity.build(name, length=32)
  result = hf_parity.compare(model, tokens, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == FAMILY[name]
  assert result["argmax_agreement"] == 1.0
  assert result["max_abs_diff"] < PARITY_TOLERANCE, result


@pytest.mark.torch
@needs_torch
@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_equal_transformers_model(name, tmp_path):
  """The preset's exported config builds a transformers model of our parameter count."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = get_preset(name)
  (tmp_path / "config.json").write_text(json.dumps(safetensors_io.config_to_hf(cfg)))
  hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path))
  with torch.device("meta"):
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  ours = count_params(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  assert ours == sum(p.numel() for p in hf_model.parameters())


# ------------------------------------------------------------------ decoding

@pytest.mark.parametrize("name", TINY)
def test_cached_decode_matches_full_forward(name):
  """Left-padded prefill + one-token steps past the sliding window give the forward's logits."""
  model = _tiny(name, seed=1)
  rng = np.random.default_rng(1)
  steps, prompt_lens = 7, (11, 5)
  seqs = [rng.integers(0, model.cfg.vocab_size, size=n + steps) for n in prompt_lens]
  tokens, mask = sampler.left_pad([s[:n] for s, n in zip(seqs, prompt_lens)])
  logits, state = sampler.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                                  cache_length=tokens.shape[1] + steps)
  got = [np.asarray(logits)]
  for i in range(steps - 1):
    feed = jnp.asarray([s[n + i] for s, n in zip(seqs, prompt_lens)], jnp.int32)
    logits, state = sampler.decode_step(model, feed, state)
    got.append(np.asarray(logits))
  got = np.stack(got, axis=1)  # [B, steps, V]
  for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
    full = _forward(model, seq[None])[0]  # [n + steps, V]
    np.testing.assert_allclose(got[row], full[n - 1:n - 1 + steps], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ("tiny_gemma2", "tiny_gemma3"))
def test_sliding_window_changes_logits_past_the_window(name):
  """The window is live: the first W positions are unchanged without it, later ones differ."""
  model = _tiny(name)
  tokens = np.random.default_rng(2).integers(0, model.cfg.vocab_size, size=(1, 12))
  windowed = _forward(model, tokens)
  unwindowed = Decoder(model.cfg.replace(sliding_window=None, sliding_layers=(),
                                         local_rope_base=None), rngs=nnx.Rngs(0))
  nnx.update(unwindowed, nnx.state(model))  # same parameters, every layer global
  full = _forward(unwindowed, tokens)
  w = model.cfg.sliding_window
  if model.cfg.local_rope_base is None:  # only the window differs: equal inside it
    np.testing.assert_allclose(windowed[:, :w], full[:, :w], atol=1e-5)
  assert np.abs(windowed[:, w:] - full[:, w:]).max() > 1e-2


def test_sliding_window_mask_slots():
  mask = jnp.ones((1, 3, 8), bool)
  # Queries at slots 4, 5, 6 (a cache filled up to slot 4) with a window of 3.
  out = np.asarray(sliding_window_mask(mask, 3, jnp.int32(4)))[0]
  assert [np.flatnonzero(r).tolist() for r in out] == [[2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7],
                                                       [4, 5, 6, 7]]
  # Only the window: causality stays the caller's mask (future slots are cut there).
  causal = jnp.tril(jnp.ones((4, 4), bool))[None]
  out = np.asarray(sliding_window_mask(causal, 2, None))[0]
  assert [np.flatnonzero(r).tolist() for r in out] == [[0], [0, 1], [1, 2], [2, 3]]


def test_traced_layer_index_equals_static():
  """Per-layer choices (window, RoPE base) also work with a traced layer index (a scan)."""
  cfg = get_preset("tiny_gemma3")
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.width))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mask = jnp.tril(jnp.ones((9, 9), bool))[None].repeat(2, 0)
  traced = nnx.jit(lambda m, i: m(x, positions, mask, layer=i)[0])
  outs = []
  for layer in range(cfg.num_layers):
    static = attn(x, positions, mask, layer=layer)[0]
    np.testing.assert_allclose(traced(attn, jnp.int32(layer)), static, atol=1e-5)
    outs.append(static)
  # Layers 0 (sliding, local base) and 2 (global) really take different paths.
  assert float(jnp.abs(outs[0] - outs[2]).max()) > 1e-3


@pytest.mark.parametrize("name", ("tiny_qwen2", "tiny_gemma3"))
def test_scanned_layers_equal_unrolled(name):
  """Stacked layers under a scan (traced layer index) compute the unrolled decoder."""
  unrolled = _tiny(name)
  scanned = decoder_from_params(unrolled.cfg, decoder_params(unrolled), scan_layers=True)
  tokens = np.random.default_rng(3).integers(0, unrolled.cfg.vocab_size, size=(2, 12))
  np.testing.assert_allclose(_forward(scanned, tokens), _forward(unrolled, tokens), atol=1e-5)


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("name", PRESETS + TINY)
def test_hf_config_roundtrip(name):
  cfg = get_preset(name)
  assert safetensors_io.config_from_hf(safetensors_io.config_to_hf(cfg)) == cfg


# The published config.json files (the keys that matter), in the Hub's own spelling.
HUB_CONFIGS = {
    "qwen2_5_0_5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "qwen3_0_6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "num_attention_heads": 16,
        "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "gemma2_2b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "sliding_window": 4096, "vocab_size": 256000},
    "gemma3_1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "vocab_size": 262144},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_published_config_gives_preset(name):
  assert safetensors_io.config_from_hf(HUB_CONFIGS[name]) == get_preset(name)


@pytest.mark.parametrize("name,expected", [
    ("qwen2_5_0_5b", 494_032_768),   # "0.49B" on the model card
    ("qwen3_0_6b", 596_049_920),
    ("gemma2_2b", 2_614_341_888),
    ("gemma3_1b", 999_885_952),
])
def test_preset_parameter_counts(name, expected):
  abstract = nnx.eval_shape(lambda: Decoder(get_preset(name), rngs=nnx.Rngs(0)))
  assert count_params(abstract) == expected


def test_transformers5_gemma3_rope_parameters():
  """transformers 5 writes nested per-layer-type RoPE parameters and layer_types."""
  hf = dict(HUB_CONFIGS["gemma3_1b"])
  for key in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
    del hf[key]
  hf["rope_parameters"] = {
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
  hf["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                       for i in range(26)]
  cfg = safetensors_io.config_from_hf(hf)
  assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 8.0
  assert cfg.replace(rope_scaling=None) == get_preset("gemma3_1b")


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
    safetensors_io.config_from_hf({"model_type": "mamba"})
  hf = dict(HUB_CONFIGS["gemma2_2b"], layer_types=["full_attention"] * 3)
  with pytest.raises(ValueError, match="layer_types must list .* 26 layers"):
    safetensors_io.config_from_hf(hf, source="x/config.json")
  with pytest.raises(ValueError, match="hidden activation 'gelu' .* gemma2"):
    safetensors_io.config_from_hf(dict(HUB_CONFIGS["gemma2_2b"], hidden_activation="gelu"))
  with pytest.raises(ValueError, match="Gemma layout needs"):
    safetensors_io.config_to_hf(get_preset("tiny").replace(post_norms=True))
  with pytest.raises(ValueError, match="attn_logit_softcap is a Gemma option"):
    safetensors_io.config_to_hf(get_preset("tiny").replace(attn_logit_softcap=10.0))
  with pytest.raises(ValueError, match="sliding-window layers need a Qwen or Gemma"):
    safetensors_io.config_to_hf(get_preset("tiny").replace(sliding_window=4,
                                                           sliding_layers=(0,)))
  with pytest.raises(ValueError, match=r"sliding_layers \[7\] are not layer indices"):
    get_preset("tiny_gemma2").replace(sliding_layers=(0, 7))
  with pytest.raises(ValueError, match="sliding_layers needs a sliding_window"):
    get_preset("tiny_gemma2").replace(sliding_window=None)


def test_config_from_json_lists_is_hashable():
  cfg = get_preset("tiny_gemma3")
  back = LlmConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert back == cfg and hash(back) == hash(cfg)


# ------------------------------------------------------------------ checkpoints

def _same_params(a: Decoder, b: Decoder) -> None:
  pa, pb = decoder_params(a), decoder_params(b)
  assert sorted(pa) == sorted(pb)
  for key in pa:
    np.testing.assert_array_equal(np.asarray(pa[key]), np.asarray(pb[key]), err_msg=key)


@pytest.mark.parametrize("name", TINY)
def test_safetensors_roundtrip(name, tmp_path):
  model = _tiny(name)
  safetensors_io.save_hf_dir(model, tmp_path)
  loaded = safetensors_io.load_hf_dir(tmp_path)
  assert loaded.cfg == model.cfg
  _same_params(model, loaded)


def test_gemma3_multimodal_checkpoint_loads_text_decoder(tmp_path):
  """A `gemma3` (vision + text) directory: config under text_config, tensors prefixed."""
  model = _tiny("tiny_gemma3")
  tensors = safetensors_io.params_to_hf(model)
  tensors = {name.replace("model.", "model.language_model.", 1): t for name, t in tensors.items()}
  tensors["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  text = safetensors_io.config_to_hf(model.cfg)
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
       "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}))
  _same_params(model, safetensors_io.load_hf_dir(tmp_path))


def test_missing_qk_norm_tensor_is_named(tmp_path):
  model = _tiny("tiny_qwen3")
  safetensors_io.save_hf_dir(model, tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.2.self_attn.k_norm.weight"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight.*missing"):
    safetensors_io.load_hf_dir(tmp_path)


def test_orbax_checkpoint_keeps_family(tmp_path):
  model = _tiny("tiny_gemma2")
  checkpoint.save_decoder(model, tmp_path / "ckpt")
  restored = checkpoint.restore_decoder(tmp_path / "ckpt")
  assert restored.cfg == model.cfg
  tokens = np.arange(10)[None] % model.cfg.vocab_size
  np.testing.assert_array_equal(_forward(restored, tokens), _forward(model, tokens))
