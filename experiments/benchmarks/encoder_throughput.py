r"""Throughput of the encoder pretraining step, and its FLOP/s against a plain matmul.

  python -m experiments.benchmarks.encoder_throughput --output=/tmp/encoder_throughput.json

Measures, in one process: events/s of the full jitted train step (forward, backward, AdamW
update) at the paper's size (6 layers x width 128, window 50, batch 128; flags change it),
the step's FLOPs from XLA's cost analysis of the compiled executable, the achieved FLOP/s,
and the FLOP/s of a float32 [M, M] x [M, M] matmul measured the same way, so the ratio says
how much of the machine's practical peak the step reaches. Prints a table, writes JSON
(`--output`) and a bar plot next to it (`--plot`, default: the JSON path with .png).

Side by side in the same run (`--compare_reference`, default on), the same step with the
textbook form of the next-item cross-entropy (optax's integer-label cross-entropy over
logits whose reserved columns are selected away, accuracy by argmax), the form the
library replaced: its backward pass scatters into and selects over the [B, E, V] logits'
gradient, and its argmax is a (value, index) reduction over them. The two forms are timed
in alternating rounds (best round each), so a load that changes during the run affects
both alike; the ratio is the figure to read.

`--profile_dir=DIR` also traces 3 steps of each form with `jax.profiler` (Perfetto traces in
DIR/ours and DIR/textbook, viewable at ui.perfetto.dev) and prints the XLA operations that
took the most time per step, each with the jax operation it came from (from the compiled
HLO's metadata).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app
from absl import flags
from flax import nnx

from user_llm_jax import params as params_lib
from user_llm_jax import sharding as sharding_lib
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import config as enc_lib
from user_llm_jax.encoder import losses
from user_llm_jax.encoder import model as enc_model
from user_llm_jax.train import summary as summary_lib
from user_llm_jax.train import train_step as train_step_lib

_LAYERS = flags.DEFINE_integer("num_layers", 6, "Encoder layers.")
_WIDTH = flags.DEFINE_integer("width", 128, "Encoder width D.")
_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_WINDOW = flags.DEFINE_integer("window", 50, "Events per example E.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Examples per step B.")
_ITEMS = flags.DEFINE_integer("num_items", 9744, "Item vocabulary (ml-latest-small: 9744).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_MATMUL = flags.DEFINE_integer("matmul_size", 1024, "M of the reference M x M x M matmul.")
_REFERENCE = flags.DEFINE_bool(
    "compare_reference", True, "Also time the step with the textbook next-item "
    "cross-entropy (alternating rounds) and report the ratio.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timing rounds per form.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Trace 3 steps with jax.profiler here and print the top XLA ops.")
_TOP_OPS = flags.DEFINE_integer("top_ops", 12, "XLA operations listed by --profile_dir.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Bar plot path (default: OUTPUT with .png).")


def _flops(compiled) -> float:
  """FLOPs of a compiled executable from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device program.
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _random_batch(cfg: enc_lib.EncoderConfig, batch_size: int, seed: int = 0) -> dict:
  """A full-length batch (every position valid) in the CropAndPad layout."""
  rng = np.random.default_rng(seed)
  shape, e, c = (batch_size, cfg.max_len), cfg.max_len, cfg.max_categories
  ints = lambda hi, s: rng.integers(schema.FIRST_ID, hi, size=s).astype(np.int32)
  cats = ints(cfg.num_categories, shape + (c,))
  cats[..., 2:] = schema.PAD_ID  # Two genres per event.
  return {
      T.INPUTS_ITEM: ints(cfg.num_items, shape), T.TARGETS_ITEM: ints(cfg.num_items, shape),
      T.INPUTS_RATING: ints(cfg.num_ratings, shape),
      T.TARGETS_RATING: ints(cfg.num_ratings, shape),
      T.INPUTS_CATEGORY: cats, T.TARGETS_CATEGORY: np.roll(cats, 1, axis=1),
      T.INPUTS_TIME: ints(cfg.num_time_buckets, shape),
      T.MASK: np.ones(shape, bool), T.LAST_INDEX: np.full((batch_size,), e - 1, np.int32),
      T.FAVORITE_CATEGORY: ints(cfg.num_categories, (batch_size,)),
      T.EXAMPLE_MASK: np.ones((batch_size,), bool),
  }


@contextlib.contextmanager
def reference_item_loss():
  """Within the block, encoders trace the textbook next-item cross-entropy: the [B, E, V]
  logits with reserved columns selected away, optax's integer-label cross-entropy (whose
  gradient scatters into the logits' gradient) and argmax accuracy."""
  fast = losses.item_softmax_cross_entropy

  def textbook(logits, target_logits, targets, mask):
    del target_logits  # The textbook form reads the target's logit from the logits.
    return losses.softmax_cross_entropy(logits, targets, mask)

  losses.item_softmax_cross_entropy = textbook
  try:
    yield
  finally:
    losses.item_softmax_cross_entropy = fast


class CompiledStep:
  """One compiled encoder train step on a fixed batch, stepped and timed."""

  def __init__(self, cfg: enc_lib.EncoderConfig, batch_size: int):
    with nnx.use_eager_sharding(False):
      model = enc_model.UserEncoder(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, train_step_lib.make_tx(train_step_lib.OptimConfig()),
                        wrt=nnx.Param)
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    self.step, self.state = train_step_lib.TrainStep.create(
        model, opt, lambda m, b: m.pretrain_loss(b, deterministic=False), mesh=mesh)
    self.params = params_lib.count_params(model)
    self.batch = _random_batch(cfg, batch_size)
    t0 = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch).compile()
    self.compile_sec = time.perf_counter() - t0
    self.flops = _flops(self.compiled)
    self.placed = self.step.place_batch(self.batch)
    self.events = int(self.batch[T.MASK].sum())
    self.i = 0
    self.metrics = None
    self.run(2)  # Warm-up (first calls also allocate).

  def run(self, steps: int, progress: str | None = None) -> float:
    """Runs `steps` steps; returns the mean seconds per step."""
    t0 = time.perf_counter()
    for _ in (tqdm.trange(steps, desc=progress) if progress else range(steps)):
      # The AOT-compiled executable directly (jit's own cache would compile again).
      self.state, self.metrics = self.compiled(self.state, self.step.rng_state, self.placed,
                                               np.int32(self.i))
      self.i += 1
      # The train loop reads every step's loss (NaN guard), so the benchmark does too.
      jax.block_until_ready(self.metrics["loss"])
    return (time.perf_counter() - t0) / steps

  def result(self, sec: float) -> dict:
    return {"sec_per_step": sec, "events_per_sec": self.events / sec,
            "events_per_step": self.events, "flops_per_step": self.flops,
            "flops_per_sec": self.flops / sec, "compile_sec": self.compile_sec,
            "params": self.params, "loss": float(self.metrics["loss"])}


def measure_step(cfg: enc_lib.EncoderConfig, batch_size: int, steps: int) -> dict:
  """Compiles the train step, times `steps` steps, and reads its FLOPs."""
  step = CompiledStep(cfg, batch_size)
  return step.result(step.run(steps, progress="train steps"))


def measure_forms(cfg: enc_lib.EncoderConfig, batch_size: int, steps: int,
                  rounds: int) -> tuple[dict, dict]:
  """The library's step and the textbook-loss step, timed in alternating rounds of
  `steps` steps; each form's best round."""
  ours = CompiledStep(cfg, batch_size)
  with reference_item_loss():
    textbook = CompiledStep(cfg, batch_size)
  best = {"ours": float("inf"), "textbook": float("inf")}
  for r in tqdm.trange(rounds, desc="alternating rounds"):
    best["ours"] = min(best["ours"], ours.run(steps))
    best["textbook"] = min(best["textbook"], textbook.run(steps))
  return ours.result(best["ours"]), textbook.result(best["textbook"])


def profile_ops(step: CompiledStep, directory: str, top: int, steps: int = 3) -> list[dict]:
  """Traces `steps` steps with jax.profiler; the `top` XLA operations by time per step.

  Returns:
    Rows {"op", "ms_per_step", "share", "source"}: the HLO instruction's name, its mean
    time per step, its share of the step's operations' time, and the jax operation it
    came from (the compiled HLO's `op_name` metadata).
  """
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    step.run(steps)
  traces = sorted(glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"),
                            recursive=True), key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {directory}")
  with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = step.compiled.as_text()
  # The HLO instructions of the step: name -> the jax operation in its metadata.
  sources = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo))
  totals: collections.Counter = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in sources:
      totals[event["name"]] += float(event.get("dur", 0.0))   # microseconds
  everything = sum(totals.values()) or 1.0
  return [{"op": name, "ms_per_step": us / steps / 1e3, "share": us / everything,
           "source": sources[name]} for name, us in totals.most_common(top)]


def measure_matmul(m: int, repeats: int = 10) -> dict:
  """FLOP/s of a jitted float32 [m, m] @ [m, m] matmul."""
  a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y))
  compiled = matmul.lower(a, b).compile()
  flops = _flops(compiled)
  if not np.isfinite(flops):
    flops = 2.0 * m**3
  jax.block_until_ready(compiled(a, b))
  best = float("inf")
  for _ in range(3):  # Best of 3 rounds: the machine is shared.
    t0 = time.perf_counter()
    for _ in range(repeats):
      out = compiled(a, b)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / repeats)
  return {"size": m, "flops": flops, "sec": best, "flops_per_sec": flops / best}


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  names = ["encoder train step", f"f32 matmul {result['matmul']['size']}^3"]
  values = [result["step"]["flops_per_sec"] / 1e9, result["matmul"]["flops_per_sec"] / 1e9]
  colors = ["tab:blue", "tab:gray"]
  if "textbook_item_loss" in result:
    names.insert(1, "textbook item loss")
    values.insert(1, result["textbook_item_loss"]["flops_per_sec"] / 1e9)
    colors.insert(1, "tab:orange")
  ax.bar(names, values, color=colors)
  ax.set_ylabel("GFLOP/s")
  ax.set_title(f"{result['config']}\n{result['step']['events_per_sec']:,.0f} events/s, "
               f"{100 * result['fraction_of_matmul']:.1f}% of matmul", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  cfg = enc_lib.ENCODER_PAPER.replace(
      num_layers=_LAYERS.value, width=_WIDTH.value, num_heads=_HEADS.value,
      max_len=_WINDOW.value, num_items=_ITEMS.value)
  textbook = None
  if _REFERENCE.value:
    step, textbook = measure_forms(cfg, _BATCH.value, _STEPS.value, _ROUNDS.value)
  else:
    step = measure_step(cfg, _BATCH.value, _STEPS.value)
  matmul = measure_matmul(_MATMUL.value)
  result = {
      "config": f"{cfg.num_layers}x{cfg.width}, window {cfg.max_len}, batch {_BATCH.value}, "
                f"{cfg.num_items} items",
      "step": step, "matmul": matmul,
      "fraction_of_matmul": step["flops_per_sec"] / matmul["flops_per_sec"],
      "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
      "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
  }
  rows = [
      ["encoder train step", f"{step['sec_per_step'] * 1e3:.1f} ms",
       f"{step['events_per_sec']:,.0f}", f"{step['flops_per_step'] / 1e9:.2f}",
       f"{step['flops_per_sec'] / 1e9:.1f}"],
  ]
  if textbook is not None:
    result["textbook_item_loss"] = textbook
    result["speedup_over_textbook"] = textbook["sec_per_step"] / step["sec_per_step"]
    rows.append(["  same, textbook item loss", f"{textbook['sec_per_step'] * 1e3:.1f} ms",
                 f"{textbook['events_per_sec']:,.0f}", f"{textbook['flops_per_step'] / 1e9:.2f}",
                 f"{textbook['flops_per_sec'] / 1e9:.1f}"])
  rows.append([f"f32 matmul {matmul['size']}^3", f"{matmul['sec'] * 1e3:.1f} ms", "-",
               f"{matmul['flops'] / 1e9:.2f}", f"{matmul['flops_per_sec'] / 1e9:.1f}"])
  print(f"\nEncoder pretraining step: {result['config']}, {step['params']:,} params, "
        f"{jax.device_count()} {jax.default_backend()} device(s), compile "
        f"{step['compile_sec']:.1f} s, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs")
  print(summary_lib.format_table(rows, ["what", "time", "events/s", "GFLOP", "GFLOP/s"]))
  print(f"achieved FLOP/s = {100 * result['fraction_of_matmul']:.1f}% of the f32 matmul's")
  if textbook is not None:
    print(f"the library's item loss: {result['speedup_over_textbook']:.2f}x the textbook "
          f"form's steps/s (best of {_ROUNDS.value} alternating rounds of {_STEPS.value} steps)")
  if _PROFILE_DIR.value:
    forms = [("ours", "the library's item loss", contextlib.nullcontext)]
    if _REFERENCE.value:
      forms.append(("textbook", "the textbook item loss", reference_item_loss))
    result["top_ops"] = {}
    for key, label, context in forms:
      with context():
        traced = CompiledStep(cfg, _BATCH.value)
      ops = profile_ops(traced, os.path.join(_PROFILE_DIR.value, key), _TOP_OPS.value)
      result["top_ops"][key] = ops
      print(f"\nTop XLA operations of the step with {label} (jax.profiler trace in "
            f"{os.path.join(_PROFILE_DIR.value, key)}):")
      print(summary_lib.format_table(
          [[o["op"], f"{o['ms_per_step']:.1f}", f"{100 * o['share']:.1f}%", o["source"][-70:]]
           for o in ops], ["XLA op", "ms / step", "share", "from"]))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    plot_path = _PLOT.value or os.path.splitext(_OUTPUT.value)[0] + ".png"
    plot(result, plot_path)
    print(f"wrote {_OUTPUT.value} and {plot_path}")
  elif _PLOT.value:
    plot(result, _PLOT.value)


if __name__ == "__main__":
  app.run(main)
