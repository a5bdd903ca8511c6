"""An ensemble of encoder runs ranks by the mean of its members' log-probabilities: a
one-member ensemble ranks exactly as its member, two members' scores equal a brute-force
mean, runs on other data are refused, and the CLI's report holds every member, the
ensemble, popularity and the paired differences on the same test users."""

import json
import shutil

import numpy as np
import pytest
from absl import app

from experiments import rank_ensemble
from experiments.benchmarks import encoder_quality
from tests import data_fixtures
from tests import test_encoder_quality
from tests import workdir_fixtures
from user_llm_jax import config as config_lib
from user_llm_jax.eval import ensemble
from user_llm_jax.eval import paired
from user_llm_jax.eval import ranking
from user_llm_jax.eval import retrieval

# The encoder-quality test's tiny arm, fewer steps.
TINY = {**test_encoder_quality.TINY, "train.num_steps": 8}
ARM = "kcore"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Two seeds of one tiny encoder arm on the same prepared data: their workdirs."""
  root = tmp_path_factory.mktemp("data")
  data_fixtures.write_synthetic(root / "ml-latest-small", num_users=40, num_items=50,
                                events_per_user_mean=25.0)
  workdirs = []
  for seed in (0, 1):
    out = tmp_path_factory.mktemp(f"seed{seed}") / "eq.json"
    encoder_quality.run(str(out), [ARM], ["ml-latest-small"], str(root),
                        overrides={**TINY, "seed": seed})
    workdirs.append(str(out.parent / "ml-latest-small" / ARM))
  return workdirs


def _batches(workdirs):
  model, members = ensemble.load_runs(workdirs)
  config = ensemble.config_of(members)
  data = ranking.RankingData.load(config, members[0].workdir)
  return model, config, data


def test_one_member_ranks_as_the_member(two_runs):
  model, config, data = _batches(two_runs[:1])
  alone = retrieval.evaluate_next_item(model.members[0], data.eval_batches(config, data.test),
                                       ids=range(len(data.test)))
  ens = retrieval.evaluate_next_item(model, data.eval_batches(config, data.test),
                                     ids=range(len(data.test)))
  # log-softmax keeps each row's order: every user's rank is the same.
  assert ens["per_example"] == alone["per_example"]
  assert ens["recall@10"] == alone["recall@10"] and ens["num_examples"] == len(data.test)


def test_two_members_score_the_mean_log_probability(two_runs):
  model, config, data = _batches(two_runs)
  batch = next(iter(data.eval_batches(config, data.test)))
  batch = {k: np.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
  got = np.asarray(model.next_item_logits(batch), np.float64)
  want = []
  for m in model.members:
    z = np.asarray(m.next_item_logits(batch), np.float64)
    finite = np.where(np.isfinite(z), z, -np.inf)
    top = finite.max(-1, keepdims=True)
    want.append(z - top - np.log(np.exp(finite - top).sum(-1, keepdims=True)))
  want = (want[0] + want[1]) / 2
  assert np.isneginf(got[:, :2]).all()     # PAD and OOV are never ranked
  np.testing.assert_allclose(got[:, 2:], want[:, 2:], rtol=1e-5, atol=1e-5)
  # The members differ (two seeds), so the mean is not either member's scores.
  a, b = (np.asarray(m.next_item_logits(batch)) for m in model.members)
  assert not np.allclose(a[:, 2:], b[:, 2:])


def test_runs_on_other_data_are_refused(two_runs, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(two_runs[1], other)
  record = json.loads((other / "run.json").read_text())
  record["config"]["data"]["window"] = 20
  (other / "run.json").write_text(json.dumps(record))
  with pytest.raises(config_lib.ConfigError, match=r"data\.window \(12 vs 20\)"):
    ensemble.load_runs([two_runs[0], str(other)])
  with pytest.raises(Exception, match="no run.json"):
    ensemble.load_runs([two_runs[0], str(tmp_path / "missing")])


def test_report_table_and_files(two_runs, tmp_path):
  report = rank_ensemble.evaluate(two_runs, ["s0", "s1"])
  assert list(report["rows"]) == ["s0", "s1", rank_ensemble.ENSEMBLE]
  n = report["num_test_users"]
  for row in report["rows"].values():
    assert row["num_examples"] == n and 0.0 <= row["recall@10"] <= 1.0
    assert "recall@10_stderr" in row and "val/ndcg@10" in row
  # Paired differences are computed from the per-user values the report keeps.
  for name in ("s0", "s1"):
    d = report["ensemble_vs_member"][name]["recall@10"]
    mine = paired.example_values(
        {paired.PER_EXAMPLE: report["per_example"][rank_ensemble.ENSEMBLE]}, "recall@10")
    theirs = paired.example_values({paired.PER_EXAMPLE: report["per_example"][name]},
                                   "recall@10")
    assert d["n"] == n and d["paired"]
    assert d["diff"] == pytest.approx(np.mean([mine[i] - theirs[i] for i in mine]))
  assert report["protocol"]["kcore_users"] == 5 and "context_check" in report
  # The context check reuses the ensemble's validation ranking: the same report as a check
  # that ranks every split itself.
  model, config, data = _batches(two_runs)
  test = retrieval.evaluate_next_item(model, data.eval_batches(config, data.test),
                                      ks=rank_ensemble.KS, ids=range(len(data.test)))
  fresh = ranking.context_check(model, config, data, ks=rank_ensemble.KS, test_metrics=test)
  assert (json.dumps(fresh, sort_keys=True, default=str)
          == json.dumps(report["context_check"], sort_keys=True, default=str))
  assert (report["context_check"]["validation"]["recall@10"]
          == report["rows"][rank_ensemble.ENSEMBLE]["val/recall@10"])
  text = rank_ensemble.write(report, str(tmp_path / "out"))
  assert "| **ensemble** |" in text and "| popularity |" in text and "- s1: recall@10" in text
  for name in ("ensemble.json", "ensemble.md", "ensemble.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0
  with pytest.raises(ValueError, match="one distinct name per run"):
    rank_ensemble.evaluate(two_runs, ["a", "a"])


def test_cli_names_its_missing_flags():
  with workdir_fixtures.flag_values(runs=None, output_dir=None):
    with pytest.raises(app.UsageError, match="--runs .* and --output_dir are required"):
      rank_ensemble.main(["rank_ensemble"])
