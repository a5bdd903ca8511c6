"""Smoke test of the encoder-quality benchmark on fixtures: a MovieLens-format and an
Amazon-format 5-core set, two arms, a tiny budget; the report, table and plot exist and
say what was measured."""

import csv
import gzip
import json
import pathlib

import pytest

from experiments.benchmarks import encoder_quality
from tests import data_fixtures
from user_llm_jax import config as config_lib

TINY = {
    "data.window": 12, "encoder.model.num_layers": 1, "encoder.model.width": 32,
    "encoder.model.num_heads": 2, "encoder.model.mlp_dim": 64,
    "encoder.model.feature_dim": 16, "train.batch_size": 16, "train.num_steps": 12,
    "train.warmup": 2, "train.log_every": 4, "train.eval_every": 4,
    "train.checkpoint_every": 4, "train.patience": 2, "eval.batch_size": 64,
}


def write_amazon_from(movielens: pathlib.Path, out: pathlib.Path) -> None:
  """The MovieLens fixture's ratings as an Amazon 2018 5-core review file."""
  out.mkdir(parents=True)
  with open(movielens / "ratings.csv", encoding="utf-8") as f, \
      gzip.open(out / "Gift_Cards_5.json.gz", "wt", encoding="utf-8") as g:
    for r in csv.DictReader(f):
      g.write(json.dumps({"reviewerID": f"U{r['userId']}", "asin": f"A{r['movieId']}",
                          "overall": float(max(1, round(float(r["rating"])))),
                          "unixReviewTime": int(r["timestamp"])}) + "\n")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  data_fixtures.write_synthetic(root / "ml-latest-small", num_users=40, num_items=50,
                                events_per_user_mean=25.0)
  write_amazon_from(root / "ml-latest-small", root / "amazon" / "Gift_Cards")
  out = tmp_path_factory.mktemp("bench") / "eq.json"
  return out, encoder_quality.run(str(out), ["kcore", "item_only", "recbole_split"],
                                  ["ml-latest-small", "Gift_Cards"], str(root),
                                  overrides=TINY)


@pytest.fixture(scope="module")
def refit_report(report):
  """The refit arm beside the report's runs (its own JSON; no early stopping: nothing is
  left to select on)."""
  out, rep = report
  manual_dir = json.loads((out.parent / "ml-latest-small" / "kcore" / "run.json")
                          .read_text())["config"]["data"]["manual_dir"]
  root = str(pathlib.Path(manual_dir).parent)
  tiny = {k: v for k, v in TINY.items() if k != "train.patience"}
  refit = encoder_quality.run(str(out.parent / "refit.json"), ["kcore_refit"],
                              ["ml-latest-small"], root, overrides=tiny)
  return root, rep, refit


def test_report_rows_protocol_and_compute(report):
  out, rep = report
  rows = {(r["dataset"], r["arm"]): r for r in rep["rows"]}
  # Ablations on MovieLens, the reference arm on Amazon.
  assert set(rows) == {("ml-latest-small", "kcore"), ("ml-latest-small", "item_only"),
                       ("ml-latest-small", "recbole_split"), ("Gift_Cards", "kcore")}
  for r in rows.values():
    assert r["protocol"]["trained_on"] == "train split"
    assert r["protocol"]["seen"] == "seen items not excluded"
    assert r["protocol"]["kcore_users"] == r["protocol"]["kcore_items"] == 5
    assert r["n"] > 0 and 0.0 <= r["recall@10"] <= 1.0 and r["recall@10_stderr"] >= 0
    assert r["pop/recall@10"] is not None
    assert r["protocol"]["timestamps"] == ("float32" if r["arm"] == "recbole_split"
                                           else "exact")
    assert 0 < r["best_step"] <= r["steps"] <= 12 and r["events"] > 0
    # The plateau check: validation and training-fit ranking at the best step.
    assert 0.0 <= r["val_recall@10_at_best"] <= 1.0
    assert 0.0 <= r["fit_recall@10_at_best"] <= 1.0
    assert 0.0 <= r["two_ahead_recall@10"]["test"] <= 1.0
  saved = json.loads(out.read_text())
  assert saved["peer"]["recall@10"] == 0.1508 and len(saved["rows"]) == 4
  assert saved["curves"]["ml-latest-small:kcore"]
  assert all({"val/recall@10", "fit/recall@10", "fit/ndcg@10"} <= set(e)
             for e in saved["curves"]["ml-latest-small:kcore"])
  # The context check ranks with the selected model: its one-step figures are the test
  # metrics and the best step's validation metrics, to the last digit.
  summary = json.loads((out.parent / "ml-latest-small" / "kcore" / "summary.json").read_text())
  check = summary["context_check"]
  assert check["test"]["recall@10"] == summary["metrics"]["recall@10"]
  assert check["test"]["ndcg@10"] == summary["metrics"]["ndcg@10"]
  best = next(e for e in summary["evals"] if e["step"] == summary["best_step"])
  assert check["validation"]["recall@10"] == pytest.approx(best["val/recall@10"], abs=1e-6)
  assert check["test_two_ahead"]["num_examples"] == check["test"]["num_examples"]
  text = (out.parent / "ml-latest-small" / "kcore" / "summary.txt").read_text()
  assert "context check" in text and "last transition" in text
  # The transition breakdown splits each split's full-context Recall@10 into the targets
  # whose last transition some training record holds and the others.
  for split, whole in (("validation", check["validation"]), ("test", check["test"])):
    t = check["transition_seen"][split]
    assert t["n_seen"] + t["n_unseen"] == t["num_examples"] == whole["num_examples"]
    assert t["fraction"] == pytest.approx(t["n_seen"] / t["num_examples"])
    parts = [t[f"recall@10_{g}"] * t[f"n_{g}"] for g in ("seen", "unseen") if t[f"n_{g}"]]
    assert sum(parts) / t["num_examples"] == pytest.approx(whole["recall@10"], abs=1e-6)
  assert "per_example" not in summary["metrics"] and "per_example" not in check["test"]
  # The first-order transition baseline on both splits, in the table's column.
  for split in ("validation", "test"):
    first = check["first_order"][split]
    assert first["num_examples"] == check[split]["num_examples"]
    assert 0.0 <= first["recall@10"] <= 1.0
  assert rows[("ml-latest-small", "kcore")]["first_order/recall@10"] == (
      check["first_order"]["test"]["recall@10"])
  assert "first-order transitions" in text
  # The model plus the transition prior: weight 0 is the model alone (its validation
  # NDCG@10 to the last digit), the selected weight has the best validation NDCG@10.
  mix = check["first_order_mix"]
  assert mix["weights"][0] == 0.0
  assert mix["validation_ndcg@10"][0] == pytest.approx(check["validation"]["ndcg@10"],
                                                       abs=1e-6)
  best = mix["weights"].index(mix["weight"])
  assert mix["validation_ndcg@10"][best] == max(mix["validation_ndcg@10"])
  assert mix["validation"]["ndcg@10"] == mix["validation_ndcg@10"][best]
  assert mix["test"]["num_examples"] == check["test"]["num_examples"]
  if mix["weight"] == 0.0:
    assert mix["test"]["recall@10"] == pytest.approx(check["test"]["recall@10"], abs=1e-6)
  assert "log(1 + transition count)" in text
  for key in ("recall@10", "ndcg@10"):   # paired over the same test users
    d = mix["test_vs_model"][key]
    assert d["paired"] and d["n"] == check["test"]["num_examples"]
    assert d["diff"] == pytest.approx(mix["test"][key] - check["test"][key], abs=1e-6)
  assert rows[("ml-latest-small", "kcore")]["mix/weight"] == mix["weight"]
  assert "1st-order R@10" in out.with_suffix(".md").read_text()
  table = out.with_suffix(".md").read_text()
  assert "RecBole SASRec (peer" in table and "item_only" in table
  assert out.with_suffix(".png").stat().st_size > 0


def test_refit_trains_on_every_event_but_the_test_one(report, refit_report):
  """`data.train_through_validation`: the training records are the validation records,
  each the normal training record plus its validation event; nothing is left to select on."""
  from user_llm_jax.data import schema  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  out, _ = report
  root, rep, refit_rep = refit_report
  (refit_row,) = refit_rep["rows"]
  kcore_row = next(r for r in rep["rows"] if r["arm"] == "kcore"
                   and r["dataset"] == "ml-latest-small")
  assert refit_row["protocol"]["trained_on"] == "train + validation events (refit)"
  assert refit_row["protocol"]["select_metric"] == "last step"
  assert refit_row["steps"] == refit_row["best_step"] == 12
  assert refit_row["val_recall@10_at_best"] is None
  assert refit_row["two_ahead_recall@10"] is None   # no validation split for the check
  assert refit_row["n"] == kcore_row["n"] and refit_row["events"] > 0
  assert "trained on train + validation events (refit)" in (
      out.parent / "ml-latest-small" / "kcore_refit" / "summary.txt").read_text()

  workdir = str(out.parent / "ml-latest-small" / "kcore")   # its prepared data is reused
  base_cfg = encoder_quality.arm_config("kcore", "ml-latest-small", root,
                                        exclude_seen=False, overrides=TINY)
  refit_cfg = encoder_quality.arm_config("kcore_refit", "ml-latest-small", root,
                                         exclude_seen=False, overrides={})
  base = ranking.RankingData.load(base_cfg, workdir)
  refit = ranking.RankingData.load(refit_cfg, workdir)
  assert refit.splits.validation is None and refit.validation_fn(refit_cfg, (10,)) is None
  assert len(refit.train) == len(base.splits.validation) == len(base.train) > 0
  for i in range(len(base.train)):
    train = list(base.train[i][schema.ITEM_IDS])
    through = list(refit.train[i][schema.ITEM_IDS])
    assert through == list(base.splits.validation[i][schema.ITEM_IDS])
    assert through[:-1] == train
  assert len(refit.test) == len(base.test)
  # A refit that would select on validation, or a split without validation, is refused
  # before any data is prepared.
  refit_cfg.train.select_metric = "val/ndcg@10"
  with pytest.raises(config_lib.ConfigError, match="'train.select_metric' is 'val/ndcg@10'"):
    ranking.RankingData.load(refit_cfg, "/nonexistent")
  refit_cfg.train.select_metric = ""
  refit_cfg.data.protocol = "paper"
  with pytest.raises(config_lib.ConfigError, match="no validation split to train through"):
    ranking.RankingData.load(refit_cfg, "/nonexistent")


def test_window_control_and_per_user_test_values(report):
  """The context check's window-excluded control, and the per-user test values the summary
  keeps for paired comparisons between runs."""
  out, _ = report
  summary = json.loads((out.parent / "ml-latest-small" / "kcore" / "summary.json").read_text())
  check = summary["context_check"]
  window = check["window_excluded"]
  assert window["test"]["num_examples"] == check["test"]["num_examples"]
  for key in ("recall@10", "ndcg@10"):
    d = window["test_vs_model"][key]
    assert d["paired"] and d["n"] == check["test"]["num_examples"]
    assert d["diff"] == pytest.approx(window["test"][key] - check["test"][key], abs=1e-6)
  assert "input window excluded (a control)" in (
      out.parent / "ml-latest-small" / "kcore" / "summary.txt").read_text()
  per_user = summary["test_per_example"]
  assert len(per_user["ids"]) == summary["metrics"]["num_examples"]
  for key in ("recall@10", "ndcg@10"):
    values = per_user["values"][key]
    assert sum(values) / len(values) == pytest.approx(summary["metrics"][key], abs=1e-5)


def test_repeat_bias_arm_is_compared_with_its_base_paired(report):
  """`BASE_OF`: an arm that differs from another by one option is reported as the paired
  difference over the same test users; without its base's run there is no comparison."""
  out, rep = report
  root = str(pathlib.Path(json.loads((out.parent / "ml-latest-small" / "kcore" / "run.json")
                                     .read_text())["config"]["data"]["manual_dir"]).parent)
  got = encoder_quality.run(str(out.parent / "repeat.json"), ["kcore_repeat_bias"],
                            ["ml-latest-small"], root, overrides=TINY)
  (r,) = got["rows"]
  base = next(b for b in rep["rows"] if b["arm"] == "kcore" and b["dataset"] == "ml-latest-small")
  for key in ("recall@10", "ndcg@10"):
    d = r["vs_base"][key]
    assert r["vs_base"]["base"] == "kcore" and d["paired"] and d["n"] == r["n"]
    assert d["diff"] == pytest.approx(r[key] - base[key], abs=1e-6)
  summary = json.loads((out.parent / "ml-latest-small" / "kcore_repeat_bias" / "summary.json")
                       .read_text())
  assert summary["metrics"]["recall@10"] == r["recall@10"]
  assert "kcore_repeat_bias - kcore" in (out.parent / "repeat.md").read_text()
  # The learned value is reported (trained: it has moved from its initial 0).
  assert isinstance(summary["repeat_bias"], float) and summary["repeat_bias"] != 0.0
  assert "learned repeat bias" in (
      out.parent / "ml-latest-small" / "kcore_repeat_bias" / "summary.txt").read_text()
  base_summary = json.loads((out.parent / "ml-latest-small" / "kcore" / "summary.json")
                            .read_text())
  assert "repeat_bias" not in base_summary
  assert all(row.get("vs_base") is None for row in rep["rows"])


def test_rerun_reuses_finished_runs(report, tmp_path):
  out, rep = report
  again = encoder_quality.run(str(out), ["kcore"], ["ml-latest-small"],
                              "/nonexistent", overrides=TINY)
  assert again["rows"][0]["recall@10"] == rep["rows"][0]["recall@10"]


def test_unknown_arm_and_key_are_named():
  with pytest.raises(config_lib.ConfigError, match="unknown arm 'nope'"):
    encoder_quality.arm_config("nope", "ml-latest-small", "/x", exclude_seen=False,
                               overrides={})
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.nope'"):
    encoder_quality.arm_config("kcore", "ml-latest-small", "/x", exclude_seen=False,
                               overrides={"train.nope": 1})


def test_transition_breakdown_by_hand():
  from user_llm_jax.eval import paired  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import popularity  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  rec = lambda *items: {"item_ids": list(items)}  # pylint: disable=unnecessary-lambda-assignment
  train = [rec(2, 3, 4), rec(5, 3)]             # transitions 2>3, 3>4, 5>3
  first_order = popularity.FirstOrder(train, num_items=7)
  assert sorted(first_order.pairs.tolist()) == [2 * 7 + 3, 3 * 7 + 4, 5 * 7 + 3]
  records = [rec(2, 3, 4, 6), rec(5, 3, 4), rec(6, 2, 3), rec(3, 5)]
  seen = ranking.last_transition_seen(records, first_order)
  assert seen.tolist() == [False, True, True, False]   # 4>6, 3>4, 2>3, 3>5 (not 5>3)
  metrics = {paired.PER_EXAMPLE: paired.per_example(range(4), {"recall@10": [1, 1, 0, 0]})}
  out = ranking.transition_breakdown(seen, metrics)
  assert out["fraction"] == 0.5 and out["n_seen"] == out["n_unseen"] == 2
  assert out["recall@10_seen"] == 0.5 and out["recall@10_unseen"] == 0.5
  with pytest.raises(ValueError, match="per-example recall@10 of 4 records"):
    ranking.transition_breakdown(seen, {"recall@10": 0.5})


def test_even_sample_spreads_over_the_source():
  from user_llm_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  sample = ranking.EvenSample(list(range(10)), 4)
  assert [sample[i] for i in range(len(sample))] == [0, 2, 5, 7]
  whole = ranking.EvenSample(list("abc"), 5)
  assert len(whole) == 3 and [whole[i] for i in range(3)] == ["a", "b", "c"]


@pytest.mark.parametrize("arm", sorted(encoder_quality.ARMS))
def test_every_arm_builds_a_config_with_its_overrides(arm):
  config = encoder_quality.arm_config(arm, "ml-latest-small", "/x", exclude_seen=False,
                                      overrides={})
  for key, value in encoder_quality.ARMS[arm].items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, (arm, key)
  # The model the arm describes is a valid encoder (widths, heads, feature counts).
  import types  # pylint: disable=g-import-not-at-top
  from user_llm_jax import models  # pylint: disable=g-import-not-at-top
  vocab = types.SimpleNamespace(num_items=10, num_ratings=8, num_categories=6)
  cfg = models.encoder_config_from(config.encoder.model, vocab, window=config.data.window,
                                   max_categories=config.data.max_categories)
  assert cfg.max_len == config.data.window
  # ... and its training section a valid one (e.g. an EMA decay with a selection metric).
  from user_llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from user_llm_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config_lib.to_dataclass(trainer.TrainConfig, config.train, "train")


def test_the_reference_arm_is_kcore_without_its_repeat_bias():
  """`:kcore` carries the repeat bias; the benchmark's reference (and every ablation built
  on it) does not, and `kcore_repeat_bias` is `:kcore` itself."""
  from experiments.configs import encoder_movielens  # pylint: disable=g-import-not-at-top
  kcore = encoder_movielens.get_config("kcore")
  assert kcore.encoder.model.repeat_bias is True
  assert encoder_movielens.get_config("paper_small").encoder.model.repeat_bias is False

  def fingerprint(arm):
    config = encoder_quality.arm_config(arm, "ml-latest-small", "/x", exclude_seen=False,
                                        overrides={})
    config.data.manual_dir = kcore.data.manual_dir
    return config_lib.fingerprint(config)
  assert config_lib.differing_keys(fingerprint("kcore_repeat_bias"),
                                   config_lib.fingerprint(kcore)) == []
  assert config_lib.differing_keys(fingerprint("kcore"), config_lib.fingerprint(kcore)) == [
      "encoder.model.repeat_bias"]


def test_kcore_long_is_the_window_200_repeat_bias_arm_on_any_split():
  """`:kcore_long` is the best arm measured (RecBole's split is the only difference)."""
  from experiments.configs import encoder_movielens  # pylint: disable=g-import-not-at-top
  long = encoder_movielens.get_config("kcore_long")
  arm = encoder_quality.arm_config("recbole_split_post_ln_attn_dropout_window_200_repeat_bias",
                                   "ml-latest-small", "/x", exclude_seen=False, overrides={})
  arm.data.manual_dir = long.data.manual_dir
  assert config_lib.differing_keys(config_lib.fingerprint(arm),
                                   config_lib.fingerprint(long)) == ["data.timestamp_precision"]


def test_compute_of_a_resumed_run_counts_every_session():
  """`row`'s wall seconds and the time to the peer's figure use the loop seconds of every
  session; a resumed run from before the record has none (not this session's alone)."""
  summary = {"compute": {"train_loop_sec": 10.0, "train_loop_sec_total": 110.0,
                         "resumed_from": 800, "steps": 1600},
             "steps": 1600, "wall_time_sec": 15.0,
             "evals": [{"step": 400, "val/recall@10": 0.10},
                       {"step": 800, "val/recall@10": 0.16}]}
  assert encoder_quality.loop_seconds(summary) == 110.0
  assert encoder_quality.first_passing(summary, "recall@10", 0.151) == {
      "step": 800, "estimated_seconds": 55.0}
  old = {**summary, "compute": {k: v for k, v in summary["compute"].items()
                                if k != "train_loop_sec_total"}}
  assert encoder_quality.loop_seconds(old) is None
  assert encoder_quality.first_passing(old, "recall@10", 0.151)["estimated_seconds"] is None
  fresh = {**old, "compute": {**old["compute"], "resumed_from": None}}
  assert encoder_quality.loop_seconds(fresh) == 10.0
