r"""Encoder quality on the recommender-systems protocol, next to the SASRec peer and popularity.

  python -m experiments.benchmarks.encoder_quality \
      --output=runs/encoder_quality/encoder_quality.json [--only=kcore,item_only,...] \
      [--datasets=ml-latest-small,Gift_Cards,All_Beauty] [--data_root=../shared/data]

Protocol (every arm, every dataset): iterative 5-core filtering of users and items,
leave-one-out by timestamp (validation = the second-to-last event, test = the last),
full-catalogue ranking, seen items NOT excluded (`--exclude_seen` switches to the other
protocol, named in every report), the best step by validation NDCG@10 with early stopping;
the config is `experiments/configs/encoder_movielens.py:kcore` without its repeat bias
(`REFERENCE`: the reference every ablation was measured against) plus the arm's overrides;
arm `kcore_repeat_bias` is the `:kcore` config itself.

Arms (`ARMS`; the ablations of the encoder, each a set of config overrides):
  kcore          the reference: SASRec-sized early-fusion encoder (2 x 64), item + rating +
                 genres + time gaps, tied item head, dropout 0.2, window 50, random windows
                 (the `:kcore` config without its repeat bias)
  recbole_split  the reference on RecBole's split (float32 timestamps: `data.timestamp_precision`),
                 the one the peer's figures were measured on
  last_window    trained on each user's most recent 51 events only (the old default)
  item_only      item ids alone (no rating, genre or time inputs; next-item loss only)
  late_fusion    one transformer per feature, fused after encoding
  separate_head  a separate D x items output table instead of the tied item embeddings
  dropout_0.1 / dropout_0.5     window_200 (batch 8: the same events per step)
  window_200_batch_32  window 200 at the reference's 32 windows per step (4x the events)
  width_32 / width_128  feature width (and feature_dim) 32 or 128 instead of 64, MLP 4x width
  no_time        item + rating + genres, without the time-gap input
  gbce           gSASRec's gBCE next-item loss over 256 sampled negatives, t = 0.75,
                 instead of the full-catalogue softmax (beside the rating and genre losses,
                 whose scale its mean over 257 terms is far below)
  gbce_item_only gBCE with item ids alone, the setting gSASRec was published in (compare
                 with item_only)
  sampled_softmax cross-entropy over the target and 256 sampled negatives (no logQ term:
                 constant under uniform sampling)
  gbce_per_position / gbce_item_only_per_position   gbce / gbce_item_only with 256
                 negatives drawn for every position, as gSASRec draws them
                 (`encoder.model.negatives_per=position`), instead of once per step
  bce_item_only_1_negative  SASRec's original loss: binary cross-entropy with one negative per
                 position (gBCE with t = 0), item ids alone
  recbole_split_min_context_40 / recbole_split_post_ln / recbole_split_post_ln_attn_dropout
                 on RecBole's split: the loss only at positions with >= 40 events of context
                 (`encoder.model.loss_min_context`), Post-LN blocks (`norm_position`), and
                 Post-LN with attention-weight dropout 0.2 (`attention_dropout`)
  recbole_split_post_ln_attn_dropout_window_200   the last with windows of 200 events
  kcore_refit / recbole_split_post_ln_attn_dropout_refit   trained on every event but the
                 test one (`data.train_through_validation`) for the step count validation chose
  kcore_repeat_bias / recbole_split_post_ln_attn_dropout[_window_200]_repeat_bias   with a
                 learned scalar on the score of every item the input window already holds
                 (`encoder.model.repeat_bias`)
Amazon 5-core sets (`data.dataset=amazon`, the folders under DATA_ROOT/amazon) run the
reference arm, and `kcore_repeat_bias` when --only names it (`AMAZON_ARMS`).

Layout (DIR = the directory of --output): DIR/<dataset>/<arm>/ is the arm's run (job
`pretrain_encoder` through the registry); a rerun reuses every finished run and resumes an
interrupted one. DIR/encoder_quality.{json,md,png}: the results (test metrics with standard
errors and n, popularity, compute: steps, best step, wall seconds, events/s), the table
with the peer's figures beside ours, and the validation curves.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from experiments.configs import encoder_movielens
from user_llm_jax import config as config_lib
from user_llm_jax import jobs
from user_llm_jax import sharding
from user_llm_jax.eval import paired
from user_llm_jax.eval import ranking
from user_llm_jax.train import summary as summary_lib

ITEM_ONLY = {"encoder.model.use_rating": False, "encoder.model.use_categories": False,
             "encoder.model.use_time": False, "encoder.model.rating_loss_weight": 0.0,
             "encoder.model.category_loss_weight": 0.0}
# gSASRec's loss as published: gBCE over 256 uniform negatives, t = 0.75.
GBCE = {"encoder.model.item_loss": "gbce", "encoder.model.item_negatives": 256,
        "encoder.model.gbce_t": 0.75}
PER_POSITION = {"encoder.model.negatives_per": "position"}
# RecBole's split (float32 timestamps) with SASRec's Post-LN blocks and attention-weight
# dropout 0.2: the best 50-event arm there, the base of its window and refit variants.
RECBOLE_POST_LN_ATTN_DROPOUT = {"data.timestamp_precision": "float32",
                                "encoder.model.norm_position": "post",
                                "encoder.model.attention_dropout": 0.2}
# Every arm starts from `:kcore` with these: the reference the ablations were measured
# against, before the repeat bias joined `:kcore` (so every arm keeps its meaning and its
# saved runs).
REFERENCE = {"encoder.model.repeat_bias": False}
# A learned scalar on the score of every item already in the input window.
REPEAT_BIAS = {"encoder.model.repeat_bias": True}
# Train on every event but the test one for a fixed step count (nothing left to select on).
REFIT = {"data.train_through_validation": True, "train.select_metric": "", "train.patience": 0}
ARMS: dict[str, dict[str, Any]] = {
    "kcore": {},
    # The same run on RecBole's split: timestamps rounded to float32 as RecBole stores
    # them, so session ties keep file order (by movie id), a third of the test items change.
    "recbole_split": {"data.timestamp_precision": "float32"},
    "last_window": {"data.train_windows": "last"},
    "item_only": ITEM_ONLY,
    "late_fusion": {"encoder.model.fusion": "late"},
    "separate_head": {"encoder.model.tie_item_head": False},
    "dropout_0.1": {"encoder.model.dropout": 0.1},
    "dropout_0.5": {"encoder.model.dropout": 0.5},
    "window_200": {"data.window": 200, "train.batch_size": 8},  # the same events per step
    # The same windows per step (4x the events): does the longer view help when the number
    # of updates per training record is unchanged?
    "window_200_batch_32": {"data.window": 200},
    # Feature width (the reference is 64 wide, SASRec's size): half and double, MLP 4x width.
    "width_32": {"encoder.model.width": 32, "encoder.model.feature_dim": 32,
                 "encoder.model.mlp_dim": 128},
    "width_128": {"encoder.model.width": 128, "encoder.model.feature_dim": 128,
                  "encoder.model.mlp_dim": 512},
    # The inputs one at a time: item + rating + genres without the time gaps.
    "no_time": {"encoder.model.use_time": False},
    # Sampled next-item losses (the ones that scale to catalogues of 10^5+ items).
    "gbce": GBCE,
    "sampled_softmax": {"encoder.model.item_loss": "sampled_softmax",
                        "encoder.model.item_negatives": 256},
    "gbce_item_only": {**ITEM_ONLY, **GBCE},
    # Without the tied head's per-item bias (gSASRec has none; with it a binary loss can
    # fit popularity alone).
    "no_item_bias": {"encoder.model.item_bias": False},
    "gbce_no_bias": {**GBCE, "encoder.model.item_bias": False},
    # Negatives drawn for every position (gSASRec's sampling) instead of once per step:
    # each step then pushes down positions x 256 items instead of 256.
    "gbce_per_position": {**GBCE, **PER_POSITION},
    "gbce_item_only_per_position": {**ITEM_ONLY, **GBCE, **PER_POSITION},
    # SASRec's original loss (binary cross-entropy, one negative per position) with item ids
    # alone: tells a fault of the sampled-loss path from gBCE's many-negative dynamics.
    "bce_item_only_1_negative": {**ITEM_ONLY, **GBCE, **PER_POSITION,
                                 "encoder.model.item_negatives": 1, "encoder.model.gbce_t": 0.0},
    # gBCE for ten times the steps: on the synthetic `:smoke` data gBCE ranks exactly as
    # popularity after the softmax's 300 steps and learns the sequences by 3,000 (README).
    "gbce_item_only_16000": {**ITEM_ONLY, **GBCE, "train.num_steps": 16000,
                             "train.eval_every": 1000, "train.checkpoint_every": 2000},
    # Against memorization (training-fit R@10 climbs while validation stays flat): decoupled
    # AdamW weight decay (the default 0.01 shrinks weights by lr x 0.01 per step).
    "weight_decay_0.1": {"train.weight_decay": 0.1},
    "weight_decay_1.0": {"train.weight_decay": 1.0},
    # Differences from RecBole's SASRec, on its split (compare with recbole_split): the next-
    # item loss only at positions whose context is complete up to 40 events (a random
    # window's early positions read contexts evaluation never sees), Post-LN blocks, and
    # Post-LN with dropout 0.2 on the attention weights.
    "recbole_split_min_context_40": {"data.timestamp_precision": "float32",
                                     "encoder.model.loss_min_context": 40},
    "recbole_split_post_ln": {"data.timestamp_precision": "float32",
                              "encoder.model.norm_position": "post"},
    "recbole_split_post_ln_attn_dropout": RECBOLE_POST_LN_ATTN_DROPOUT,
    # RecBole's SASRec reads windows of 50; SASRec+ (the published full-softmax SASRec)
    # 200. The best RecBole-split arm with the longer view, at 32 windows per step.
    "recbole_split_post_ln_attn_dropout_window_200": {**RECBOLE_POST_LN_ATTN_DROPOUT,
                                                      "data.window": 200},
    # Refits (`data.train_through_validation`): the reference arms retrained on every event
    # but the test one for the step count their validation chose (1,600 both), so that the
    # test context's newest event is one the model was fitted on, as a validation
    # context's is (`ranking.context_check`). A different protocol from the peer's.
    "kcore_refit": REFIT,
    "recbole_split_post_ln_attn_dropout_refit": {**RECBOLE_POST_LN_ATTN_DROPOUT, **REFIT},
    # The repeat bias (`encoder.model.repeat_bias`): the reference and the best arms of
    # each window with one learned scalar on the items the window already holds (the
    # context check's `window_excluded` control measures what such items cost).
    "kcore_repeat_bias": REPEAT_BIAS,
    "recbole_split_post_ln_attn_dropout_repeat_bias": {**RECBOLE_POST_LN_ATTN_DROPOUT,
                                                       **REPEAT_BIAS},
    "recbole_split_post_ln_attn_dropout_window_200_repeat_bias": {
        **RECBOLE_POST_LN_ATTN_DROPOUT, "data.window": 200, **REPEAT_BIAS},
    # Polyak averaging (`train.ema_decay`): validation, the selected step and the test
    # figures read a moving average of the weights (about the last 100 steps at 0.99).
    "recbole_split_post_ln_attn_dropout_repeat_bias_ema_0.99": {
        **RECBOLE_POST_LN_ATTN_DROPOUT, **REPEAT_BIAS, "train.ema_decay": 0.99},
}
# Arms compared with another arm of the same run, paired over the same test users (the
# arm differs from it by one option): `row`'s `vs_base`.
BASE_OF = {"kcore_repeat_bias": "kcore",
           "recbole_split_post_ln_attn_dropout_repeat_bias": "recbole_split_post_ln_attn_dropout",
           "recbole_split_post_ln_attn_dropout_window_200_repeat_bias":
               "recbole_split_post_ln_attn_dropout_window_200",
           "recbole_split_post_ln_attn_dropout_repeat_bias_ema_0.99":
               "recbole_split_post_ln_attn_dropout_repeat_bias"}
# The arms the Amazon 5-core sets run (when --only names them).
AMAZON_ARMS = ("kcore", "kcore_repeat_bias")
# Where each dataset lives under --data_root, and its reader.
DATASETS = {"ml-latest-small": ("ml-latest-small", "movielens"),
            "Gift_Cards": ("amazon/Gift_Cards", "amazon"),
            "All_Beauty": ("amazon/All_Beauty", "amazon")}
# RecBole 1.2.1 SASRec on ml-latest-small, 5-core, leave-one-out, full ranking, seen items
# not excluded (measured on a 2-core machine; see the README's "Encoder quality").
PEER = {"name": "RecBole SASRec (peer; its split = recbole_split)", "dataset": "ml-latest-small",
        "recall@1": 0.0246, "recall@5": 0.0836, "recall@10": 0.1508, "ndcg@10": 0.0751,
        "popularity/recall@10": 0.0230, "best_epoch": 14, "seconds_to_best": 14 * 99}
TARGETS = {"recall@10": 0.18, "ndcg@10": 0.09}
KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@10")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    what: str) -> None:
  """Sets dotted keys in `config` (in place); an unknown key is an error naming it."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise config_lib.ConfigError(f"{what}: override {key!r}: no section {part!r}")
      node = node[part]
    if parts[-1] not in node:
      raise config_lib.ConfigError(f"{what}: unknown config key {key!r}; keys there: "
                                   + ", ".join(sorted(node.keys())))
    node[parts[-1]] = value


def arm_config(arm: str, dataset: str, data_root: str, *, exclude_seen: bool,
               overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The `:kcore` config with `REFERENCE` and the arm's overrides, on `dataset`."""
  if arm not in ARMS:
    raise config_lib.ConfigError(f"unknown arm {arm!r}; known: {sorted(ARMS)}")
  if dataset not in DATASETS:
    raise config_lib.ConfigError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
  config = encoder_movielens.get_config("kcore")
  folder, reader = DATASETS[dataset]
  config.name = f"encoder_quality:{dataset}:{arm}"
  config.data.dataset = reader
  config.data.manual_dir = os.path.join(data_root, folder)
  config.eval.exclude_seen = exclude_seen
  apply_overrides(config, REFERENCE, "REFERENCE")
  apply_overrides(config, ARMS[arm], f"arm {arm!r}")
  apply_overrides(config, overrides, "--overrides")
  return config


def run_arm(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or reuses) one arm; returns its summary."""
  path = os.path.join(workdir, summary_lib.SUMMARY_JSON)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  with sharding.axis_rules(tuple(config.mesh.rules)):
    summary = jobs.resolve(config.job)(config, workdir)
  if summary.get("preempted"):
    raise RuntimeError(f"run {workdir} was preempted; rerun to resume it")
  return summary


def first_passing(summary: Mapping[str, Any], key: str, value: float) -> dict[str, Any] | None:
  """The first evaluation whose `val/<key>` reaches `value`, with its estimated wall time
  (the loop's seconds of every session, prorated by step: an estimate, evaluations
  included; None for a resumed run whose earlier sessions' seconds were not recorded)."""
  loop = loop_seconds(summary)
  for e in summary.get("evals", []):
    if e.get(f"val/{key}", -1.0) >= value:
      seconds = None if loop is None else loop * e["step"] / max(summary["steps"], 1)
      return {"step": e["step"], "estimated_seconds": seconds}
  return None


def loop_seconds(summary: Mapping[str, Any]) -> float | None:
  """Training-loop seconds of every session of the run (this session's for a fresh run;
  None for a resumed run whose earlier sessions' seconds were not recorded)."""
  c = summary["compute"]
  if "train_loop_sec_total" in c:
    return c["train_loop_sec_total"]
  return c["train_loop_sec"] if c.get("resumed_from") is None else None


def row(dataset: str, arm: str, summary: Mapping[str, Any]) -> dict[str, Any]:
  """One result row: test metrics with standard errors, popularity, compute."""
  m, c = summary["metrics"], summary["compute"]
  out = {"dataset": dataset, "arm": arm, "n": m.get("num_examples"),
         "protocol": summary["protocol"]}
  for key in KEYS:
    out[key] = m[key]
    out[f"{key}_stderr"] = m.get(f"{key}_stderr")
    out[f"pop/{key}"] = m.get(f"popularity/{key}")
  # Without selection (a refit) the last step is the one reported.
  loop = loop_seconds(summary)
  # Wall seconds of every session: this one's, plus the loops of those before a resume.
  wall = (None if loop is None
          else summary["wall_time_sec"] + loop - c["train_loop_sec"])
  out.update(steps=c["steps"], best_step=c.get("best_step", summary.get("best_step")),
             stopped_early=c.get("stopped_early"), wall_sec=wall, train_loop_sec=loop,
             events=c.get("events"), events_per_sec=c.get("events_per_sec"),
             num_items=summary["dataset"]["num_items"] - 2,
             reached_peer_recall10=first_passing(summary, "recall@10", PEER["recall@10"]),
             **fit_at_best(summary))
  # Validation / test Recall@10 two steps ahead (`ranking.context_check`), None before it.
  check = summary.get("context_check")
  out["two_ahead_recall@10"] = (
      {split: check[f"{split}_two_ahead"]["recall@10"] for split in ("validation", "test")}
      if check else None)
  # The first-order transition baseline on the test split (None before it existed).
  out["first_order/recall@10"] = (check["first_order"]["test"]["recall@10"]
                                  if check and "first_order" in check else None)
  # The model plus the first-order counts (weight chosen on validation): test R@10.
  mix = (check or {}).get("first_order_mix")
  out["mix/recall@10"] = mix["test"]["recall@10"] if mix else None
  out["mix/ndcg@10"] = mix["test"]["ndcg@10"] if mix else None
  out["mix/weight"] = mix["weight"] if mix else None
  return out


def versus_base(out_dir: str, dataset: str, arm: str,
                summary: Mapping[str, Any]) -> dict[str, Any] | None:
  """The arm minus its base arm (`BASE_OF`) on test Recall@10 and NDCG@10, paired over the
  test users both scored; None when the arm has no base or the base's run is not in
  `out_dir` (it is not run for this: name it in --only)."""
  base = BASE_OF.get(arm)
  path = os.path.join(out_dir, dataset, base or "", summary_lib.SUMMARY_JSON)
  if base is None or not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    other = json.load(f)

  def metrics(s):   # the test metrics with their per-user values, when the run kept them
    return {**s["metrics"], **({paired.PER_EXAMPLE: s[ranking.TEST_PER_EXAMPLE]}
                               if ranking.TEST_PER_EXAMPLE in s else {})}
  return {"base": base, **ranking.paired_differences(metrics(summary), metrics(other))}


def fit_at_best(summary: Mapping[str, Any]) -> dict[str, float | None]:
  """Validation and training-fit Recall@10 at the best (or last) evaluation: `fit` far
  above `val` is memorization, level with it under-fitting (`ranking.validation_fn`)."""
  evals = [e for e in summary.get("evals", []) if "fit/recall@10" in e]
  if not evals:   # runs made before the fit metric existed
    return {"val_recall@10_at_best": None, "fit_recall@10_at_best": None}
  best = summary["compute"].get("best_step")
  at = next((e for e in evals if e["step"] == best), evals[-1])
  return {"val_recall@10_at_best": at["val/recall@10"],
          "fit_recall@10_at_best": at["fit/recall@10"]}


def table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table, the peer's row beside ours."""
  head = ("| dataset | method | n | R@1 | R@5 | R@10 | NDCG@10 | pop R@10 | pop NDCG@10 | "
          "1st-order R@10 | + 1st-order: R@10, NDCG@10 (w) | val / fit R@10 at best | "
          "val / test R@10 two ahead | steps (best) | wall s | events/s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]

  def se(r, key):
    s = r.get(f"{key}_stderr")
    return f"{r[key]:.4f} ± {s:.4f}" if s is not None else f"{r[key]:.4f}"

  for r in rows:
    eps = f"{r['events_per_sec']:,.0f}" if r.get("events_per_sec") else "-"
    wall = f"{r['wall_sec']:.0f}" if r.get("wall_sec") is not None else "- (resumed)"
    fit = (f"{r['val_recall@10_at_best']:.3f} / {r['fit_recall@10_at_best']:.3f}"
           if r.get("fit_recall@10_at_best") is not None else "-")
    two = r.get("two_ahead_recall@10")
    two = f"{two['validation']:.3f} / {two['test']:.3f}" if two else "-"
    first = (f"{r['first_order/recall@10']:.4f}"
             if r.get("first_order/recall@10") is not None else "-")
    mix = (f"{r['mix/recall@10']:.4f}, {r['mix/ndcg@10']:.4f} ({r['mix/weight']:g})"
           if r.get("mix/recall@10") is not None else "-")
    lines.append(
        f"| {r['dataset']} | {r['arm']} | {r['n']} | {se(r, 'recall@1')} | "
        f"{se(r, 'recall@5')} | {se(r, 'recall@10')} | {se(r, 'ndcg@10')} | "
        f"{r['pop/recall@10']:.4f} | {r['pop/ndcg@10']:.4f} | {first} | {mix} | {fit} | "
        f"{two} | {r['steps']} ({r['best_step']}) | {wall} | {eps} |")
  versus = [r for r in rows if r.get("vs_base")]
  if versus:
    lines += ["", "| dataset | arm - base | R@10 difference (2 SE) | NDCG@10 difference (2 SE) "
              "| n, paired |", "|---|---|---|---|---|"]
  for r in versus:
    v = r["vs_base"]
    lines.append(f"| {r['dataset']} | {r['arm']} - {v['base']} | "
                 + " | ".join(f"{v[k]['diff']:+.4f} ({2 * v[k]['se']:.4f})"
                              for k in ("recall@10", "ndcg@10"))
                 + f" | {v['recall@10']['n']}, {'yes' if v['recall@10']['paired'] else 'no'} |")
  p = PEER
  lines.insert(2 + len(rows), f"| {p['dataset']} | {p['name']} | 610 | {p['recall@1']:.4f} | "
               f"{p['recall@5']:.4f} | {p['recall@10']:.4f} | {p['ndcg@10']:.4f} | "
               f"{p['popularity/recall@10']:.4f} | - | - | - | - | - | epoch {p['best_epoch']} | "
               f"{p['seconds_to_best']} (to best) | - |")
  return "\n".join(lines)


def plot(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str) -> None:
  """Validation NDCG@10 and Recall@10 against steps, one line per run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("val/ndcg@10", "val/recall@10")):
    for name, evals in curves.items():
      pts = [(e["step"], e[key]) for e in evals if key in e]
      if pts:
        ax.plot(*zip(*pts), "o-", ms=3, label=name)
    if key == "val/recall@10":
      ax.axhline(PEER["recall@10"], color="gray", ls="--", label="peer test R@10")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(output: str, arms: Sequence[str], datasets: Sequence[str], data_root: str, *,
        exclude_seen: bool = False, overrides: Mapping[str, Any] | None = None
        ) -> dict[str, Any]:
  """Runs the arms on the datasets; writes the JSON, table and plot; returns the report."""
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  rows, curves = [], {}
  for dataset in datasets:
    # The ablations on MovieLens; the Amazon sets run the requested arms of AMAZON_ARMS
    # (the reference alone when none is requested).
    for arm in (arms if DATASETS.get(dataset, ("", "movielens"))[1] == "movielens"
                else [a for a in arms if a in AMAZON_ARMS] or ["kcore"]):
      config = arm_config(arm, dataset, data_root, exclude_seen=exclude_seen,
                          overrides=overrides or {})
      summary = run_arm(config, os.path.join(out_dir, dataset, arm))
      rows.append(row(dataset, arm, summary))
      rows[-1]["vs_base"] = versus_base(out_dir, dataset, arm, summary)
      curves[f"{dataset}:{arm}"] = summary.get("evals", [])
  report = {"protocol": rows[0]["protocol"] if rows else {}, "rows": rows, "peer": PEER,
            "targets": TARGETS, "curves": curves,
            "benchmark_sec": time.perf_counter() - start}
  text = table(rows)
  tmp = output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=str)
  os.replace(tmp, output)
  with open(os.path.splitext(output)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(text + "\n")
  plot(curves, os.path.splitext(output)[0] + ".png")
  print(text, flush=True)
  return report


def define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that importing this
  module (tests) never clashes with other modules' flags (e.g. `--output`)."""
  flags.DEFINE_string("output", "runs/encoder_quality/encoder_quality.json",
                      "Where the JSON report goes (runs next to it).")
  flags.DEFINE_list("only", ["kcore", "item_only", "last_window"],
                    f"Arms to run on the MovieLens set; known: {sorted(ARMS)}.")
  flags.DEFINE_list("datasets", list(DATASETS), "Datasets to run.")
  flags.DEFINE_string("data_root", "../shared/data",
                      "Directory holding ml-latest-small/ and amazon/.")
  flags.DEFINE_bool("exclude_seen", False, "Exclude the user's earlier items from the ranking.")
  flags.DEFINE_string("overrides", "",
                      "JSON dict of config overrides for every run (e.g. a smoke budget).")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  overrides = json.loads(f.overrides) if f.overrides else {}
  run(f.output, f.only, f.datasets, f.data_root, exclude_seen=f.exclude_seen,
      overrides=overrides)


if __name__ == "__main__":
  define_flags()
  app.run(main)
