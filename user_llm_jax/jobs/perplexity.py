"""Perplexity job: `--mode=perplexity` prints `perplexity: X` for a text file.

Writes WORKDIR/perplexity.json with the perplexity, token count, summed NLL, and the
load and scoring wall times.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import flags

from user_llm_jax import sharding
from user_llm_jax.config import ConfigError

_TEXT_FILE = flags.DEFINE_string(
    "text_file", None, "UTF-8 text file to score (perplexity mode); overrides "
    "config.perplexity.text_file.")


def _load(config: ml_collections.ConfigDict, workdir: str, mesh):
  from user_llm_jax.llm import loading  # pylint: disable=g-import-not-at-top
  from user_llm_jax.llm.config import get_preset  # pylint: disable=g-import-not-at-top
  llm = config.llm
  if llm.source == "random":
    from user_llm_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
    tokenizer = prompts.byte_level_tokenizer()
    cfg = get_preset(llm.preset, vocab_size=tokenizer.vocab_size, dtype=llm.dtype)
    loaded = loading.load_llm("random", cfg, seed=config.seed, mesh=mesh)
    return loaded.model, tokenizer, loaded.seconds
  cache_dir = os.path.expanduser(llm.cache_dir) or os.path.join(workdir, "llm_cache")
  loaded = loading.load_llm(llm.source, dtype=llm.dtype, mesh=mesh, cache_dir=cache_dir)
  if loaded.tokenizer is None:
    raise ConfigError(f"config key 'llm.source'={llm.source!r} has no tokenizer "
                      "(tokenizer.json next to the weights, or GGUF tokenizer metadata)")
  return loaded.model, loaded.tokenizer, loaded.seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the text file named by --text_file (or config.perplexity.text_file)."""
  from user_llm_jax.llm import perplexity  # pylint: disable=g-import-not-at-top
  flag = _TEXT_FILE.value if flags.FLAGS.is_parsed() else None
  text_file = flag or config.perplexity.text_file
  if not text_file:
    raise ConfigError("perplexity needs a text file: pass --text_file=FILE "
                      "(or set config key 'perplexity.text_file')")
  if not os.path.isfile(text_file):
    raise FileNotFoundError(f"--text_file {text_file!r} does not exist")
  mesh = sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  model, tokenizer, load_seconds = _load(config, workdir, mesh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    result = perplexity.file_perplexity(model, tokenizer, text_file,
                                        window=config.perplexity.window,
                                        stride=config.perplexity.stride)
  summary = {"config": config.name, "llm_source": config.llm.source, "text_file": text_file,
             "perplexity": result.perplexity, "num_tokens": result.num_tokens,
             "nll": result.nll, "load_seconds": load_seconds,
             "score_seconds": time.perf_counter() - start}
  with open(os.path.join(workdir, "perplexity.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"tokens: {result.num_tokens}  load: {load_seconds:.1f}s  "
        f"score: {summary['score_seconds']:.1f}s")
  print(f"perplexity: {result.perplexity:.4f}")
  return summary
