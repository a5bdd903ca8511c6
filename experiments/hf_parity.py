r"""Logit parity with Hugging Face `transformers` (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3).

Our weights are exported to a safetensors directory (HF layout + config.json of the
model's family), loaded by transformers' `AutoModelForCausalLM` (PyTorch, float32, CPU),
and both models score the same tokens; the table reports the max/mean absolute logit
difference (pass: max < 1e-3; the tiny random configs are tested at 1e-4). The tiny
configs get random norm weights and biases (not their ones/zeros init) so that a wrong
name or layout of those tensors shows in the logits.

  pip install torch==2.13.0 transformers   # CPU wheels; no TensorFlow
  python -m experiments.hf_parity --models=tiny,tiny_llama3,smollm2 --output=/tmp/parity.json
  python -m experiments.hf_parity \
      --models=tiny_qwen2,tiny_qwen3,tiny_gemma2,tiny_gemma3 --output=/tmp/families.json
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from user_llm_jax.llm import config as config_lib
from user_llm_jax.llm.config import LLM_TINY, RopeScaling
from user_llm_jax.llm.model import Decoder
from user_llm_jax.llm.safetensors_io import save_hf_dir

_MODELS: flags.FlagHolder
_OUTPUT: flags.FlagHolder
_LENGTH: flags.FlagHolder


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a script, so that importing
  this module for its functions (tests, notebooks) never clashes with other flags."""
  global _MODELS, _OUTPUT, _LENGTH
  _MODELS = flags.DEFINE_list("models", ["tiny", "tiny_llama3", "smollm2"],
                              f"Which models to compare: {', '.join(TINY_CONFIGS)}, smollm2.")
  _OUTPUT = flags.DEFINE_string("output", "hf_parity.json", "Where to write the JSON results.")
  _LENGTH = flags.DEFINE_integer("length", 64, "Tokens per sequence.")


TOLERANCE = 1e-3

# Tiny configs: GQA with an untied head, and Llama-3 RoPE scaling with a tied head.
TINY_CONFIGS = {
    "tiny": LLM_TINY,
    "tiny_llama3": LLM_TINY.replace(
        tie_embeddings=True, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)),
    **{name: config_lib.get_preset(name)
       for name in ("tiny_qwen2", "tiny_qwen3", "tiny_gemma2", "tiny_gemma3")},
}


def hf_logits(directory: str | pathlib.Path, tokens: np.ndarray) -> np.ndarray:
  """Float32 logits [B,T,V] of transformers' causal LM (any family) from `directory`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def compare(model: Decoder, tokens: np.ndarray, workdir: str | pathlib.Path) -> dict:
  """Exports `model` to `workdir`, scores `tokens` with both implementations."""
  start = time.perf_counter()
  save_hf_dir(model, workdir)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ours = np.asarray(nnx.jit(lambda m, x, p: m(x, positions=p)[0])(model, jnp.asarray(tokens),
                                                                    positions))
  theirs = hf_logits(workdir, tokens)
  diff = np.abs(ours - theirs)
  return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
          "logit_scale": float(np.abs(theirs).max()),
          "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
          "tokens": int(b * t), "seconds": time.perf_counter() - start,
          "passed": bool(diff.max() < TOLERANCE)}


def randomize_small_params(model: Decoder, seed: int = 0) -> Decoder:
  """Adds N(0, 0.2^2) noise to every norm weight and bias, in place.

  They start as constants (ones or zeros), under which a swapped norm, a misnamed bias or
  a (1 + w) read as w would still give the right logits.
  """
  rng = np.random.default_rng(seed)

  def noisy(path, value):
    name = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
    if name in ("scale", "bias"):
      return value + 0.2 * rng.standard_normal(value.shape).astype(np.float32)
    return value

  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree_util.tree_map_with_path(noisy, state))
  return model


def build(name: str, length: int) -> tuple[Decoder, np.ndarray]:
  """The model `name` and a [2, length] batch of token ids to score."""
  if name in TINY_CONFIGS:
    model = randomize_small_params(Decoder(TINY_CONFIGS[name], rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    return model, rng.integers(0, model.cfg.vocab_size, size=(2, length))
  if name == "smollm2":
    from user_llm_jax.llm.loading import load_llm  # pylint: disable=g-import-not-at-top
    model, tok, _ = load_llm("smollm2")
    text = ("The city council met on Tuesday evening to discuss the plan for a new bus line "
            "that would connect the university with the train station. Several residents "
            "spoke in favor of the proposal, saying that it would reduce traffic.")
    ids = (tok.encode(text) * 4)[:length]
    return model, np.asarray([ids, ids[::-1]])
  raise app.UsageError(f"unknown model {name!r}; choose from {', '.join(TINY_CONFIGS)}, "
                       "smollm2")


def main(argv):
  del argv
  results = {}
  for name in _MODELS.value:
    model, tokens = build(name, _LENGTH.value)
    with tempfile.TemporaryDirectory() as d:
      results[name] = compare(model, tokens, d)
  print(f"{'model':<12} {'max|diff|':>11} {'mean|diff|':>11} {'max|logit|':>11} "
        f"{'argmax=':>8} {'pass':>5}")
  for name, r in results.items():
    print(f"{name:<12} {r['max_abs_diff']:>11.3e} {r['mean_abs_diff']:>11.3e} "
          f"{r['logit_scale']:>11.2f} {r['argmax_agreement']:>8.3f} {str(r['passed']):>5}")
  pathlib.Path(_OUTPUT.value).write_text(json.dumps(
      {"tolerance": TOLERANCE, "results": results}, indent=2))
  print(f"wrote {_OUTPUT.value}")
  if not all(r["passed"] for r in results.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
