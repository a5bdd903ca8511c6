r"""Compile time of the decoder with unrolled vs scanned layers (`llm.scan_layers`).

Lowers and compiles, for each layer form, the same two functions on abstract inputs (no
weights are loaded; compile time depends on shapes alone):

  train    loss and gradients of next-token cross-entropy over [B, T] tokens (full
           fine-tuning: every parameter gets a gradient)
  decode   one greedy step of one token per row against a KV cache of S slots

Forms: `unrolled` (a Python loop of layers, the default), `scanned` (one scan over
stacked layers) and `scanned_remat` (scanned, each layer rematerialised with
`--remat_policy`). With `--xattn_every` the decoder carries the User-LLM's gated
cross-attention blocks (from `--xattn_first`), so the scanned form runs one scan per
stretch of layers between blocks. The forms alternate within each repeat so that load from
other processes hits them alike; the persistent compilation cache is off. Reported per
(step, form): the median wall and process-CPU seconds of `lower` and of `compile`, and the
size of the lowered StableHLO text. Ratios are unrolled / form (> 1: faster to compile), in
wall and in process-CPU seconds (the fairer one when other jobs share the machine).

  python -m experiments.benchmarks.compile_time --output=/tmp/compile_time.json
  python -m experiments.benchmarks.compile_time --xattn_every=5 --xattn_first=15 \
      --output=/tmp/compile_time_xattn.json
  python -m experiments.benchmarks.compile_time --preset=tiny --batch=2 --seq_len=16 \
      --cache_len=32 --output=/tmp/compile_tiny.json   # smoke
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.benchmarks import reporting
from user_llm_jax.bridge import cross_attention
from user_llm_jax.llm.config import get_preset
from user_llm_jax.llm.model import Decoder

FORMS = ("unrolled", "scanned", "scanned_remat")
STEPS = ("train", "decode")

_PRESET: flags.FlagHolder
_BATCH: flags.FlagHolder
_SEQ_LEN: flags.FlagHolder
_CACHE_LEN: flags.FlagHolder
_FORMS: flags.FlagHolder
_REMAT: flags.FlagHolder
_XATTN_EVERY: flags.FlagHolder
_XATTN_FIRST: flags.FlagHolder
_REPEATS: flags.FlagHolder
_OUTPUT: flags.FlagHolder
_PLOT: flags.FlagHolder


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script)."""
  global _PRESET, _BATCH, _SEQ_LEN, _CACHE_LEN, _FORMS, _REMAT
  global _XATTN_EVERY, _XATTN_FIRST, _REPEATS, _OUTPUT, _PLOT
  _PRESET = flags.DEFINE_string("preset", "smollm2_135m", "LLM preset (architecture only).")
  _BATCH = flags.DEFINE_integer("batch", 8, "Rows B of the train and decode steps.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens T per row of the train step.")
  _CACHE_LEN = flags.DEFINE_integer("cache_len", 256, "KV-cache slots S of the decode step.")
  _FORMS = flags.DEFINE_list("forms", list(FORMS), f"Layer forms to compile, from {FORMS}.")
  _REMAT = flags.DEFINE_string("remat_policy", "full", "Remat policy of `scanned_remat`.")
  _XATTN_EVERY = flags.DEFINE_integer("xattn_every", 0, "Cross-attention block every k "
                                      "layers (0: a plain decoder).")
  _XATTN_FIRST = flags.DEFINE_integer("xattn_first", 0, "First layer with a block.")
  _REPEATS = flags.DEFINE_integer("repeats", 1, "Compiles per (step, form); median reported.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results JSON here.")
  _PLOT = flags.DEFINE_string("plot", None, "Write a bar plot here (default: --output with "
                              ".png).")


def _layout(form: str, remat_policy: str) -> dict:
  if form not in FORMS:
    raise ValueError(f"--forms: unknown form {form!r}; expected some of {FORMS}")
  return {"scan_layers": form != "unrolled",
          "remat_policy": remat_policy if form == "scanned_remat" else "none"}


def abstract_decoder(preset: str, form: str, remat_policy: str, xattn_every: int,
                     xattn_first: int) -> Decoder:
  """The decoder of `form` as shapes only (`nnx.eval_shape`), with blocks if asked."""
  cfg = get_preset(preset)

  def build():
    with nnx.use_eager_sharding(False):
      model = Decoder(cfg, rngs=nnx.Rngs(0), **_layout(form, remat_policy))
      if xattn_every:
        cross_attention.insert_cross_attention(model, xattn_every, first=xattn_first,
                                               rngs=nnx.Rngs(1))
    return model

  return nnx.eval_shape(build)


def step_functions(model: Decoder, batch: int, seq_len: int, cache_len: int,
                   events: int = 16) -> dict[str, tuple[Callable, tuple]]:
  """{step: (pure function of (state, inputs...), abstract arguments)} for `model`."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  with_context = len(model.cross_attention) > 0
  spec = jax.ShapeDtypeStruct
  context = spec((batch, events, cfg.width), jnp.float32) if with_context else None

  def train(state, tokens, context):
    def loss(state):
      m = nnx.merge(graphdef, state)
      positions = jnp.broadcast_to(jnp.arange(seq_len - 1, dtype=jnp.int32),
                                   (batch, seq_len - 1))
      logits, _ = m(tokens[:, :-1], positions=positions, context=context)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return jax.value_and_grad(loss)(state)

  def decode(state, cache, token, context):
    m = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(cache.end_index, (batch, 1)).astype(jnp.int32)
    logits, cache = m(token, positions=positions, cache=cache, context=context)
    return jnp.argmax(logits[:, -1], axis=-1), cache

  cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))
  return {
      "train": (train, (state, spec((batch, seq_len), jnp.int32), context)),
      "decode": (decode, (state, cache, spec((batch, 1), jnp.int32), context)),
  }


def compile_once(fn: Callable, args: tuple) -> dict[str, float]:
  """Wall / CPU seconds of lowering and compiling a fresh jit of `fn` on `args`."""
  jitted = jax.jit(lambda *a: fn(*a))  # a new function object: no in-memory cache hit
  w0, c0 = time.perf_counter(), time.process_time()
  lowered = jitted.lower(*args)
  w1, c1 = time.perf_counter(), time.process_time()
  lowered.compile()
  w2, c2 = time.perf_counter(), time.process_time()
  return {"lower_s": w1 - w0, "lower_cpu_s": c1 - c0, "compile_s": w2 - w1,
          "compile_cpu_s": c2 - c1, "hlo_chars": len(lowered.as_text())}


def run_benchmark(*, preset: str, forms: list[str], batch: int, seq_len: int,
                  cache_len: int, remat_policy: str, xattn_every: int, xattn_first: int,
                  repeats: int) -> dict:
  """Compiles every (step, form) `repeats` times, forms alternating; returns the results."""
  models = {form: abstract_decoder(preset, form, remat_policy, xattn_every, xattn_first)
            for form in forms}
  functions = {form: step_functions(m, batch, seq_len, cache_len) for form, m in models.items()}
  runs: dict[str, dict[str, list[dict]]] = {s: {f: [] for f in forms} for s in STEPS}
  for r in range(repeats):
    for step in STEPS:
      for form in forms:
        fn, args = functions[form][step]
        runs[step][form].append(compile_once(fn, args))
        last = runs[step][form][-1]
        print(f"repeat {r} {step:6s} {form:14s} lower {last['lower_s']:6.1f} s  compile "
              f"{last['compile_s']:6.1f} s", flush=True)
  rows = []
  for step in STEPS:
    for form in forms:
      one = runs[step][form]
      row = {"step": step, "form": form, "runs": one}
      for key in ("lower_s", "lower_cpu_s", "compile_s", "compile_cpu_s", "hlo_chars"):
        row[key] = statistics.median(x[key] for x in one)
      row["total_s"] = row["lower_s"] + row["compile_s"]
      row["total_cpu_s"] = row["lower_cpu_s"] + row["compile_cpu_s"]
      rows.append(row)
  for row in rows:
    base = next((r for r in rows if r["step"] == row["step"] and r["form"] == "unrolled"),
                None)
    row["speedup_vs_unrolled"] = (base["total_s"] / row["total_s"]) if base else None
    # CPU seconds are the fairer measure on a machine shared with other jobs.
    row["cpu_speedup_vs_unrolled"] = (base["total_cpu_s"] / row["total_cpu_s"]) if base else None
  return {"preset": preset, "batch": batch, "seq_len": seq_len, "cache_len": cache_len,
          "remat_policy": remat_policy, "xattn_every": xattn_every,
          "xattn_first": xattn_first, "repeats": repeats, "jax": jax.__version__,
          "backend": jax.default_backend(), "rows": rows}


def format_table(results: dict) -> str:
  head = (f"{results['preset']}  B={results['batch']} T={results['seq_len']} "
          f"S={results['cache_len']}  xattn_every={results['xattn_every']} "
          f"first={results['xattn_first']}  ({results['backend']}, median of "
          f"{results['repeats']})")
  lines = [head, f"{'step':7s} {'form':14s} {'lower s':>8s} {'compile s':>10s} "
           f"{'total s':>8s} {'lower cpu':>10s} {'compile cpu':>12s} {'total cpu':>10s} "
           f"{'HLO kchars':>11s} {'x unrolled (wall / cpu)':>24s}"]
  for row in results["rows"]:
    wall, cpu = row["speedup_vs_unrolled"], row["cpu_speedup_vs_unrolled"]
    ratio = "" if wall is None else f"{wall:.1f}x / {cpu:.1f}x"
    lines.append(f"{row['step']:7s} {row['form']:14s} {row['lower_s']:8.1f} "
                 f"{row['compile_s']:10.1f} {row['total_s']:8.1f} {row['lower_cpu_s']:10.1f} "
                 f"{row['compile_cpu_s']:12.1f} {row['total_cpu_s']:10.1f} "
                 f"{row['hlo_chars'] / 1e3:11.0f} {ratio:>24s}")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  forms = list(dict.fromkeys(r["form"] for r in results["rows"]))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  width = 0.8 / len(forms)
  for ax, key, label in ((axes[0], "total_s", "wall s"), (axes[1], "total_cpu_s", "CPU s")):
    for j, form in enumerate(forms):
      values = [next(r[key] for r in results["rows"]
                     if r["step"] == step and r["form"] == form) for step in STEPS]
      ax.bar([i + j * width for i in range(len(STEPS))], values, width, label=form)
    ax.set_xticks([i + width * (len(forms) - 1) / 2 for i in range(len(STEPS))], STEPS)
    ax.set_ylabel(f"lower + compile ({label})")
    ax.legend()
  fig.suptitle(f"{results['preset']}: compile time by layer form"
               + (f" (x-attn every {results['xattn_every']} from {results['xattn_first']})"
                  if results["xattn_every"] else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  # Measure compilation itself, not a disk cache of earlier runs.
  jax.config.update("jax_enable_compilation_cache", False)
  results = run_benchmark(
      preset=_PRESET.value, forms=list(_FORMS.value), batch=_BATCH.value,
      seq_len=_SEQ_LEN.value, cache_len=_CACHE_LEN.value, remat_policy=_REMAT.value,
      xattn_every=_XATTN_EVERY.value, xattn_first=_XATTN_FIRST.value,
      repeats=_REPEATS.value)
  print(format_table(results))
  reporting.write_results(results, _OUTPUT.value, _PLOT.value, plot)


if __name__ == "__main__":
  define_flags()
  app.run(main)
