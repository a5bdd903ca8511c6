"""Hugging Face checkpoints: safetensors import/export and the HF <-> decoder name map.

A Hugging Face directory holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json`. Tensors use HF names and the torch `nn.Linear` layout
(out, in), e.g. `model.layers.3.self_attn.q_proj.weight` [N*H, D]. Nothing here reads
pickles. The GGUF importer converts to the same HF naming and reuses `hf_to_params`.

Families (HF `model_type`) and what their layers add to Llama's names:

  llama         -
  qwen2         self_attn.{q,k,v}_proj.bias
  qwen3         self_attn.{q,k}_norm.weight
  gemma2        pre_feedforward_layernorm, post_feedforward_layernorm; its
                post_attention_layernorm is the norm *after* attention, not before the MLP
  gemma3_text   as gemma2, plus self_attn.{q,k}_norm.weight (`gemma3` multimodal
                checkpoints: the text decoder under `model.language_model.` or
                `language_model.model.`)

The family of a config is not stored: `hf_family` derives it from the `LlmConfig`
switches, and refuses a combination no HF architecture computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from user_llm_jax.llm.config import LlmConfig, RopeScaling, alternating_sliding
from user_llm_jax.llm.model import Decoder, decoder_from_params, decoder_params

CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
# Where multimodal Gemma 3 checkpoints keep the text decoder (new and older transformers).
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def hf_family(cfg: LlmConfig) -> str:
  """The HF `model_type` whose modules compute exactly what `cfg` does.

  Raises:
    ValueError: naming the switches no HF architecture combines this way.
  """
  gemma = (cfg.norm_scale_offset == 1.0, cfg.scale_embeddings, cfg.post_norms,
           cfg.mlp_activation == "gelu_tanh")
  if any(gemma):
    if not all(gemma):
      raise ValueError("a Gemma layout needs norm_scale_offset=1, scale_embeddings, post_norms "
                       "and mlp_activation='gelu_tanh' together; got "
                       f"{cfg.norm_scale_offset}, {cfg.scale_embeddings}, {cfg.post_norms}, "
                       f"{cfg.mlp_activation!r}")
    if cfg.attention_bias:
      raise ValueError("Gemma's HF attention_bias also biases the output projection; "
                       "q/k/v-only biases are Qwen2's")
    if not cfg.qk_norm and cfg.local_rope_base is not None:
      raise ValueError("local_rope_base (a RoPE base for sliding layers) is Gemma 3's, which "
                       "also has qk_norm")
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.norm_scale_offset != 0.0:
    raise ValueError(f"norm_scale_offset={cfg.norm_scale_offset}: HF norms use 0 or 1 (Gemma)")
  for name in ("attn_logit_softcap", "final_logit_softcap", "local_rope_base"):
    if getattr(cfg, name) is not None:
      raise ValueError(f"{name} is a Gemma option; this config is not a Gemma layout")
  if cfg.attention_scale != cfg.head_dim ** -0.5:
    raise ValueError("query_pre_attn_scalar other than head_dim is a Gemma option")
  if cfg.qk_norm:
    if cfg.attention_bias:
      raise ValueError("Qwen3's HF attention_bias also biases the output projection; "
                       "q/k/v-only biases with qk_norm have no HF architecture")
    return "qwen3"
  if cfg.attention_bias:
    return "qwen2"
  if cfg.sliding_layers:
    raise ValueError("sliding-window layers need a Qwen or Gemma layout; HF Llama has none")
  return "llama"


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One checkpoint tensor: its HF name, our parameter name and shape, and the layout.

  kinds: 'same' (norm scales, the embedding table), 'transpose' ((out, in) <-> [in, out]),
  'heads_in' ([N*H, D] <-> [D, N, H]), 'heads_out' ([D, N*H] <-> [N, H, D]),
  'heads_bias' ([N*H] <-> [N, H]).
  """
  hf: str
  ours: str
  shape: tuple[int, ...]
  kind: str = "same"

  @property
  def hf_shape(self) -> tuple[int, ...]:
    s = self.shape
    if self.kind == "transpose":
      return s[::-1]
    if self.kind == "heads_in":    # [D, N, H] -> [N*H, D]
      return (s[1] * s[2], s[0])
    if self.kind == "heads_out":   # [N, H, D] -> [D, N*H]
      return (s[2], s[0] * s[1])
    if self.kind == "heads_bias":  # [N, H] -> [N*H]
      return (s[0] * s[1],)
    return s

  def to_ours(self, t: np.ndarray) -> np.ndarray:
    if self.kind in ("transpose", "heads_in", "heads_out"):
      t = t.T
    return t.reshape(self.shape)

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    if self.kind == "heads_in":
      return p.reshape(self.shape[0], -1).T
    if self.kind == "heads_out":
      return p.reshape(-1, self.shape[-1]).T
    if self.kind == "transpose":
      return p.T
    return p.reshape(self.hf_shape)


def tensor_map(cfg: LlmConfig) -> list[_Tensor]:
  """Every tensor of `cfg`'s HF checkpoint, paired with its decoder parameter."""
  family = hf_family(cfg)
  d, n, k, h, f, v = (cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  out = [_Tensor("model.embed_tokens.weight", "embedder/embedding", (v, d)),
         _Tensor("model.norm.weight", "final_norm/scale", (d,))]
  if not cfg.tie_embeddings:
    out.append(_Tensor("lm_head.weight", "lm_head/kernel", (d, v), "transpose"))
  gemma = family.startswith("gemma")
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", f"layers/{i}"
    attn = f"{hf}.self_attn"
    out += [
        _Tensor(f"{hf}.input_layernorm.weight", f"{ours}/attn_norm/scale", (d,)),
        _Tensor(f"{attn}.q_proj.weight", f"{ours}/attn/q/kernel", (d, n, h), "heads_in"),
        _Tensor(f"{attn}.k_proj.weight", f"{ours}/attn/k/kernel", (d, k, h), "heads_in"),
        _Tensor(f"{attn}.v_proj.weight", f"{ours}/attn/v/kernel", (d, k, h), "heads_in"),
        _Tensor(f"{attn}.o_proj.weight", f"{ours}/attn/o/kernel", (n, h, d), "heads_out"),
        _Tensor(f"{hf}.mlp.gate_proj.weight", f"{ours}/mlp/gate/kernel", (d, f), "transpose"),
        _Tensor(f"{hf}.mlp.up_proj.weight", f"{ours}/mlp/up/kernel", (d, f), "transpose"),
        _Tensor(f"{hf}.mlp.down_proj.weight", f"{ours}/mlp/down/kernel", (f, d), "transpose"),
    ]
    if gemma:  # four norms: HF's post_attention_layernorm follows attention here
      out += [
          _Tensor(f"{hf}.post_attention_layernorm.weight", f"{ours}/attn/post_norm/scale", (d,)),
          _Tensor(f"{hf}.pre_feedforward_layernorm.weight", f"{ours}/mlp_norm/scale", (d,)),
          _Tensor(f"{hf}.post_feedforward_layernorm.weight", f"{ours}/mlp/post_norm/scale",
                  (d,)),
      ]
    else:  # Llama/Qwen: post_attention_layernorm is the norm before the MLP
      out.append(_Tensor(f"{hf}.post_attention_layernorm.weight", f"{ours}/mlp_norm/scale", (d,)))
    if cfg.attention_bias:
      out += [_Tensor(f"{attn}.{p}_proj.bias", f"{ours}/attn/{p}/bias", (heads, h), "heads_bias")
              for p, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.qk_norm:
      out += [_Tensor(f"{attn}.{p}_norm.weight", f"{ours}/attn/{p}_norm/scale", (h,))
              for p in ("q", "k")]
  return out


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: LlmConfig, *,
                 source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Converts HF-named (out, in) tensors to the decoder's {dotted path: array} layout.

  Raises:
    ValueError: naming `source` and the HF tensor when one is missing or mis-shaped.
  """
  out = {}
  for spec in tensor_map(cfg):
    if spec.hf not in tensors:
      raise ValueError(f"{source}: tensor {spec.hf!r} is missing (expected shape "
                       f"{spec.hf_shape})")
    t = tensors[spec.hf]
    if tuple(t.shape) != spec.hf_shape:
      raise ValueError(f"{source}: tensor {spec.hf!r} has shape {tuple(t.shape)}, "
                       f"expected {spec.hf_shape} for this config")
    out[spec.ours] = np.ascontiguousarray(spec.to_ours(np.asarray(t, dtype=np.float32)))
  return out


def params_to_hf(model: Decoder) -> dict[str, np.ndarray]:
  """The decoder's parameters as HF-named float32 (out, in) numpy tensors.

  LoRA adapters must be merged first (`lora.merge_lora`); cross-attention blocks are not
  part of an LLM checkpoint and are left out.
  """
  p = {key: np.asarray(val, np.float32) for key, val in decoder_params(model).items()}
  lora = [key for key in p if "lora" in key]
  if lora:
    raise ValueError(f"merge LoRA adapters before export (found {lora[:3]})")
  return {spec.hf: np.ascontiguousarray(spec.to_hf(p[spec.ours]))
          for spec in tensor_map(model.cfg)}


def _rope_scaling(scaling: Mapping | None, source: str) -> RopeScaling | None:
  """RopeScaling from an HF `rope_scaling` / `rope_parameters` dict (None: unscaled)."""
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  if kind in (None, "default"):
    return None
  if kind == "llama3":
    return RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  if kind == "linear":
    return RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
  raise ValueError(f"{source}: unsupported rope scaling {dict(scaling)}")


def _rope(hf: Mapping, family: str, source: str
          ) -> tuple[float, RopeScaling | None, float | None]:
  """(rope_base, rope_scaling, local_rope_base) from Hub-style or transformers-5 keys."""
  params = hf.get("rope_parameters") or {}
  if family == "gemma3_text":
    # transformers 5 nests the parameters per layer type; Hub configs have flat keys.
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    if _rope_scaling(local, source) is not None:
      raise ValueError(f"{source}: RoPE scaling of the sliding layers is not supported")
    base = full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0
    scaling = _rope_scaling(hf.get("rope_scaling") or full, source)
    local_base = local.get("rope_theta") or hf.get("rope_local_base_freq") or 10_000.0
    return float(base), scaling, float(local_base)
  scaling = hf.get("rope_scaling") or params
  base = hf.get("rope_theta") or scaling.get("rope_theta") or 10_000.0
  return float(base), _rope_scaling(scaling, source), None


def _sliding(hf: Mapping, family: str, num_layers: int, source: str
             ) -> tuple[int | None, tuple[int, ...]]:
  """(sliding_window, sliding_layers): explicit `layer_types`, else each family's rule."""
  window = hf.get("sliding_window")
  if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None  # Qwen configs carry a window that is off unless use_sliding_window
  if family == "llama" or window is None:
    return None, ()
  types = hf.get("layer_types")
  if types is not None:
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
      raise ValueError(f"{source}: layer_types must list 'sliding_attention' or "
                       f"'full_attention' for each of the {num_layers} layers, got {types}")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
  elif family == "gemma2":
    layers = alternating_sliding(num_layers, 2)
  elif family == "gemma3_text":
    layers = alternating_sliding(num_layers, int(hf.get("sliding_window_pattern", 6)))
  else:  # Qwen: the layers from max_window_layers on
    layers = tuple(range(int(hf.get("max_window_layers", 28)), num_layers))
  return (int(window), layers) if layers else (None, ())


def config_from_hf(hf: Mapping, *, source: str = CONFIG_JSON, **overrides) -> LlmConfig:
  """LlmConfig from a Hugging Face `config.json` dict (model_type in `FAMILIES`, or
  'gemma3' whose `text_config` is read)."""
  family = hf.get("model_type", "llama")
  if family == "gemma3":
    if "text_config" not in hf:
      raise ValueError(f"{source}: a 'gemma3' config needs its 'text_config'")
    hf = dict(hf["text_config"], tie_word_embeddings=hf.get("tie_word_embeddings", True))
    family = "gemma3_text"
  if family not in FAMILIES:
    raise ValueError(f"{source}: model_type {family!r} is not supported; expected one of "
                     f"{FAMILIES + ('gemma3',)}")
  gemma = family.startswith("gemma")
  try:
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    rope_base, rope_scaling, local_base = _rope(hf, family, source)
    window, sliding_layers = _sliding(hf, family, layers, source)
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], num_layers=layers,
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], rope_base=rope_base, rope_scaling=rope_scaling,
        rope_layout="rotate_half", norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        # The HF classes' defaults when a config leaves it out: Gemma ties, others do not.
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        attention_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3_text"),
        sliding_window=window, sliding_layers=sliding_layers)
    if gemma:
      caps = {"attn_logit_softcap": 50.0, "final_logit_softcap": 30.0} if family == "gemma2" else {}
      fields.update(
          norm_scale_offset=1.0, mlp_activation="gelu_tanh", post_norms=True,
          scale_embeddings=True,
          query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
          attn_logit_softcap=hf.get("attn_logit_softcapping", caps.get("attn_logit_softcap")),
          final_logit_softcap=hf.get("final_logit_softcapping",
                                     caps.get("final_logit_softcap")),
          local_rope_base=local_base if sliding_layers else None)
  except KeyError as e:
    raise ValueError(f"{source}: required key {e.args[0]!r} is missing") from e
  act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma
                                                                  else "silu")
  expected_act = "gelu_pytorch_tanh" if gemma else "silu"
  if act != expected_act:
    raise ValueError(f"{source}: hidden activation {act!r} is not supported for {family} "
                     f"(need {expected_act!r})")
  if family != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise ValueError(f"{source}: attention/mlp biases are not supported for {family}")
  if hf.get("use_bidirectional_attention"):
    raise ValueError(f"{source}: use_bidirectional_attention is not supported (causal only)")
  cfg = LlmConfig(**fields)
  return cfg.replace(**overrides) if overrides else cfg


def _int_if_whole(x: float) -> int | float:
  """Published configs (and transformers' typed config fields) hold integers here."""
  return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: LlmConfig, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
  """A Hugging Face config dict for `cfg` (its `hf_family`, float32 weights), in the keys
  the published checkpoints use."""
  family = hf_family(cfg)
  if cfg.rope_layout != "rotate_half":
    raise ValueError("HF checkpoints use the rotate_half RoPE layout, not "
                     f"{cfg.rope_layout!r} (GGUF's permuted q/k rows)")
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "torch_dtype": "float32", "rope_scaling": None,
  }
  if family.startswith("gemma"):
    hf.update(hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
              attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap)
    if family == "gemma3_text":
      hf["rope_local_base_freq"] = cfg.local_rope_base or cfg.rope_base
  else:
    hf.update(hidden_act="silu", mlp_bias=False)
  if family == "qwen2":
    del hf["attention_bias"]  # Qwen2's q/k/v biases are not optional
    if cfg.head_dim * cfg.num_heads != cfg.width:
      raise ValueError(f"HF Qwen2 derives head_dim from hidden_size / heads; head_dim="
                       f"{cfg.head_dim} x {cfg.num_heads} heads != width {cfg.width}")
  if cfg.sliding_layers:
    hf["sliding_window"] = cfg.sliding_window
    hf["layer_types"] = ["sliding_attention" if cfg.is_sliding(i) else "full_attention"
                         for i in range(cfg.num_layers)]
    if family in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=True, max_window_layers=min(cfg.sliding_layers))
  elif family.startswith("gemma"):
    # No layer slides; HF Gemma still builds a sliding mask, so give it a harmless window.
    hf.update(sliding_window=cfg.max_seq_len, layer_types=["full_attention"] * cfg.num_layers)
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    hf["rope_scaling"] = ({"rope_type": "linear", "factor": s.factor}
                          if s.rope_type == "linear" else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings})
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


def text_decoder_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The text decoder's tensors under causal-LM names (multimodal prefixes renamed)."""
  if "model.embed_tokens.weight" in tensors:
    return dict(tensors)
  out = {}
  for name, t in tensors.items():
    for prefix, plain in _TEXT_PREFIXES:
      if name.startswith(prefix):
        out[plain + name[len(prefix):]] = t
        break
  return out or dict(tensors)


def load_hf_dir(directory: str | os.PathLike, cfg: LlmConfig | None = None, *, mesh=None,
                **overrides) -> Decoder:
  """Loads a Hugging Face safetensors directory (any family in `FAMILIES`) into a `Decoder`.

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
  tensors = text_decoder_tensors(read_hf_tensors(directory))
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints still store the (identical) head; it is redundant here.
    tensors.pop("lm_head.weight")
  params = hf_to_params(tensors, cfg, source=str(directory))
  return decoder_from_params(cfg, params, source=str(directory), mesh=mesh)


def save_hf_dir(model: Decoder, directory: str | os.PathLike, *,
                bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
  """Writes `model` as a HF directory of its family (config.json + model.safetensors,
  float32)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = config_to_hf(model.cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  tensors = params_to_hf(model)
  tmp = directory / (SINGLE_FILE + ".tmp")
  safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, directory / SINGLE_FILE)
  (directory / CONFIG_JSON).write_text(json.dumps(config, indent=2))
