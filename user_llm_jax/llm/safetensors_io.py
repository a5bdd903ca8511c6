"""Hugging Face Llama checkpoints: safetensors import/export and the HF <-> decoder name map.

A Hugging Face directory holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json`. Tensors use HF names and the torch `nn.Linear` layout
(out, in), e.g. `model.layers.3.self_attn.q_proj.weight` [N*H, D]. Nothing here reads
pickles. The GGUF importer converts to the same HF naming and reuses `hf_to_params`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from user_llm_jax.llm.config import LlmConfig, RopeScaling
from user_llm_jax.llm.model import Decoder, decoder_from_params, decoder_params

CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: LlmConfig, *,
                 source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Converts HF-named (out, in) tensors to the decoder's {dotted path: array} layout.

  Raises:
    ValueError: naming `source` and the HF tensor when one is missing or mis-shaped.
  """
  d, n, k, h, f, v = (cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {shape})")
    t = tensors[name]
    if tuple(t.shape) != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                       f"expected {shape} for this config")
    return np.asarray(t, dtype=np.float32)

  out = {"embedder/embedding": get("model.embed_tokens.weight", (v, d)),
         "final_norm/scale": get("model.norm.weight", (d,))}
  if not cfg.tie_embeddings:
    out["lm_head/kernel"] = get("lm_head.weight", (v, d)).T
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", f"layers/{i}"
    out[f"{ours}/attn_norm/scale"] = get(f"{hf}.input_layernorm.weight", (d,))
    out[f"{ours}/mlp_norm/scale"] = get(f"{hf}.post_attention_layernorm.weight", (d,))
    attn = f"{hf}.self_attn"
    out[f"{ours}/attn/q/kernel"] = get(f"{attn}.q_proj.weight", (n * h, d)).T.reshape(d, n, h)
    out[f"{ours}/attn/k/kernel"] = get(f"{attn}.k_proj.weight", (k * h, d)).T.reshape(d, k, h)
    out[f"{ours}/attn/v/kernel"] = get(f"{attn}.v_proj.weight", (k * h, d)).T.reshape(d, k, h)
    out[f"{ours}/attn/o/kernel"] = get(f"{attn}.o_proj.weight", (d, n * h)).T.reshape(n, h, d)
    out[f"{ours}/mlp/gate/kernel"] = get(f"{hf}.mlp.gate_proj.weight", (f, d)).T
    out[f"{ours}/mlp/up/kernel"] = get(f"{hf}.mlp.up_proj.weight", (f, d)).T
    out[f"{ours}/mlp/down/kernel"] = get(f"{hf}.mlp.down_proj.weight", (d, f)).T
  return {key: np.ascontiguousarray(val) for key, val in out.items()}


def params_to_hf(model: Decoder) -> dict[str, np.ndarray]:
  """The decoder's parameters as HF-named float32 (out, in) numpy tensors.

  LoRA adapters must be merged first (`lora.merge_lora`); cross-attention blocks are not
  part of a Llama checkpoint and are left out.
  """
  cfg = model.cfg
  p = {key: np.asarray(val, np.float32) for key, val in decoder_params(model).items()}
  lora = [key for key in p if "lora" in key]
  if lora:
    raise ValueError(f"merge LoRA adapters before export (found {lora[:3]})")
  d = cfg.width
  out = {"model.embed_tokens.weight": p["embedder/embedding"],
         "model.norm.weight": p["final_norm/scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head/kernel"].T
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", f"layers/{i}"
    out[f"{hf}.input_layernorm.weight"] = p[f"{ours}/attn_norm/scale"]
    out[f"{hf}.post_attention_layernorm.weight"] = p[f"{ours}/mlp_norm/scale"]
    for proj in ("q", "k", "v"):
      out[f"{hf}.self_attn.{proj}_proj.weight"] = p[f"{ours}/attn/{proj}/kernel"].reshape(d, -1).T
    out[f"{hf}.self_attn.o_proj.weight"] = p[f"{ours}/attn/o/kernel"].reshape(-1, d).T
    for proj in ("gate", "up", "down"):
      out[f"{hf}.mlp.{proj}_proj.weight"] = p[f"{ours}/mlp/{proj}/kernel"].T
  return {key: np.ascontiguousarray(val) for key, val in out.items()}


def config_from_hf(hf: Mapping, *, source: str = CONFIG_JSON, **overrides) -> LlmConfig:
  """LlmConfig from a Hugging Face Llama `config.json` dict."""
  try:
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_base = hf.get("rope_theta") or (scaling or {}).get("rope_theta", 10_000.0)
    rope_scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
      rope_scaling = RopeScaling(
          factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
      raise ValueError(f"{source}: unsupported rope scaling {scaling}")
    cfg = LlmConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], rope_base=float(rope_base),
        rope_scaling=rope_scaling, rope_layout="rotate_half",
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)))
  except KeyError as e:
    raise ValueError(f"{source}: required key {e.args[0]!r} is missing") from e
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (need 'silu')")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError(f"{source}: attention/mlp biases are not supported")
  return cfg.replace(**overrides) if overrides else cfg


def config_to_hf(cfg: LlmConfig, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
  """A Hugging Face `LlamaConfig` dict for `cfg` (float32 weights)."""
  hf = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
      "rope_scaling": None,
  }
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
  if bos_token_id is not None:
    hf["bos_token_id"] = bos_token_id
  if eos_token_id is not None:
    hf["eos_token_id"] = eos_token_id
  return hf


def _read_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads one safetensors file to float32 numpy (bfloat16 through ml_dtypes)."""
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
  except TypeError:
    # numpy has no bfloat16: fall back to the jax reader, which has it.
    return {k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(str(path)).items()}


def read_hf_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a HF directory (single file or sharded with an index)."""
  directory = pathlib.Path(directory)
  index = directory / INDEX_FILE
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      if not (directory / shard).exists():
        raise ValueError(f"{index}: shard {shard!r} listed in weight_map does not exist")
      tensors.update(_read_file(directory / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f"{index}: tensors {missing[:5]} listed but absent from their shards")
    return tensors
  single = directory / SINGLE_FILE
  if not single.exists():
    raise ValueError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  return _read_file(single)


def load_hf_dir(directory: str | os.PathLike, cfg: LlmConfig | None = None, *, mesh=None,
                **overrides) -> Decoder:
  """Loads a Hugging Face Llama safetensors directory into a `Decoder`.

  Args:
    directory: holds config.json and model.safetensors (or an index and shards).
    cfg: architecture; read from config.json when None.
    mesh: place each parameter directly on this mesh by its logical axes (large models).
    **overrides: LlmConfig fields to change (e.g. dtype='bfloat16').
  """
  directory = pathlib.Path(directory)
  if cfg is None:
    config_path = directory / CONFIG_JSON
    if not config_path.exists():
      raise ValueError(f"{directory}: {CONFIG_JSON} not found (or pass cfg=)")
    try:
      hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    cfg = config_from_hf(hf, source=str(config_path))
  if overrides:
    cfg = cfg.replace(**overrides)
  tensors = read_hf_tensors(directory)
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints still store the (identical) head; it is redundant here.
    tensors.pop("lm_head.weight")
  params = hf_to_params(tensors, cfg, source=str(directory))
  return decoder_from_params(cfg, params, source=str(directory), mesh=mesh)


def save_hf_dir(model: Decoder, directory: str | os.PathLike, *,
                bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
  """Writes `model` as a HF Llama directory (config.json + model.safetensors, float32)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = params_to_hf(model)
  tmp = directory / (SINGLE_FILE + ".tmp")
  safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, directory / SINGLE_FILE)
  (directory / CONFIG_JSON).write_text(json.dumps(
      config_to_hf(model.cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id), indent=2))

