"""Iterative k-core filtering of users and items before the protocol cuts records."""

import json

import numpy as np
import pytest

from data_pipelines import builder as builder_lib
from data_pipelines import prepare, timelines
from data_pipelines.readers import make_reader
from tests import data_fixtures as fx
from tests.test_prepare import _run_cli
from user_llm_jax.data import schema

# With kcore_users=3, kcore_items=2:
#   pass 1 removes items 91, 92, 93 (one event each) and user 4 (one event);
#   pass 2 removes user 3 (2 events left after pass 1); pass 3 removes nothing.
# Left: users 1 and 2, items 10, 11, 12, 6 events.
KCORE_RATINGS = [
    (1, 10, 4.0, 1), (1, 11, 3.0, 2), (1, 91, 5.0, 3), (1, 12, 2.0, 4),
    (2, 10, 4.0, 1), (2, 11, 3.0, 2), (2, 12, 1.0, 3),
    (3, 10, 4.0, 5), (3, 92, 4.0, 6), (3, 11, 4.0, 7),
    (4, 93, 4.0, 1),
]
KCORE_MOVIES = [(m, f"Movie {m} (2000)", ("Drama",) if m < 90 else ("Horror",))
                for m in (10, 11, 12, 91, 92, 93)]
EXPECTED = {"kcore_users": 3, "kcore_items": 2, "rounds": 2, "users_removed": 2,
            "items_removed": 3, "events_removed": 5, "users_left": 2, "items_left": 3,
            "events_left": 6}


def write_kcore_fixture(directory):
  return fx.write_movielens_csv(directory, ratings=KCORE_RATINGS, movies=KCORE_MOVIES)


def _peel_one_at_a_time(user, item, min_user, min_item, rng):
  """Reference: remove one random violating user or item at a time until none is left."""
  keep = np.ones(len(user), bool)
  while True:
    bad = [("u", u) for u in np.unique(user[keep]) if (user[keep] == u).sum() < min_user]
    bad += [("i", i) for i in np.unique(item[keep]) if (item[keep] == i).sum() < min_item]
    if not bad:
      return keep
    kind, code = bad[rng.integers(len(bad))]
    keep &= (user != code) if kind == "u" else (item != code)


@pytest.mark.parametrize("seed", range(5))
def test_kcore_mask_is_the_unique_maximal_core(seed):
  rng = np.random.default_rng(seed)
  n = 300
  user = rng.integers(0, 40, n) ** 2 % 40  # Skewed: some heavy, some light users.
  item = rng.integers(0, 60, n) ** 2 % 60
  for min_user, min_item in ((3, 3), (5, 2), (0, 4), (4, 0)):
    keep, rounds = timelines.kcore_mask(user, item, min_user, min_item)
    np.testing.assert_array_equal(keep, _peel_one_at_a_time(user, item, min_user, min_item,
                                                            rng))
    if keep.any():
      assert np.bincount(user[keep])[np.unique(user[keep])].min() >= min_user
      assert np.bincount(item[keep])[np.unique(item[keep])].min() >= min_item
    assert rounds >= (not keep.all())


def test_build_timelines_keeps_the_kcore_and_reports_it(tmp_path):
  write_kcore_fixture(tmp_path)
  options = timelines.TimelineOptions(kcore_users=3, kcore_items=2)
  tl = timelines.build_timelines(make_reader("movielens", tmp_path), options,
                                 show_progress=False)
  s = tl.statistics
  assert s["kcore"] == EXPECTED
  assert {k: v for k, v in s["drops"]["counts"].items() if k.startswith("kcore")} == {
      "kcore_users_removed": 2, "kcore_items_removed": 3, "kcore_events_removed": 5}
  # Read counts are before the filter; the timelines are after it.
  assert (s["events_read"], s["events_after_dedup"], s["users_read"], s["items_read"]) == (
      11, 11, 4, 6)
  assert (s["users_kept"], s["events_kept"]) == (2, 6)
  tests = {rec[schema.USER_ID]: rec for _, rec in tl.records("test")}
  assert set(tests) == {"1", "2"}
  np.testing.assert_array_equal(tests["1"][schema.TIMESTAMPS], [1, 2, 4])  # 91 (t=3) gone.
  np.testing.assert_array_equal(tests["2"][schema.TIMESTAMPS], [1, 2, 3])
  # Train records are each user's first event (leave-last-out on 3 events): item 10.
  assert [it.raw_id for it in tl.vocabulary.items[schema.FIRST_ID:]] == ["10"]
  assert "Horror" not in tl.vocabulary.categories  # Only the removed items had it.


def test_kcore_off_by_default_and_validated(tmp_path):
  write_kcore_fixture(tmp_path)
  tl = timelines.build_timelines(make_reader("movielens", tmp_path),
                                 timelines.TimelineOptions(), show_progress=False)
  assert "kcore" not in tl.statistics and tl.statistics["events_kept"] == 10
  assert not timelines.TimelineOptions(kcore_users=1, kcore_items=1).kcore
  with pytest.raises(ValueError, match="kcore_users and kcore_items must be >= 0"):
    timelines.TimelineOptions(kcore_users=-1)
  with pytest.raises(timelines.EmptyDatasetError, match="k-core filtering .* removed all 11"):
    timelines.build_timelines(make_reader("movielens", tmp_path),
                              timelines.TimelineOptions(kcore_users=50),
                              show_progress=False)


def test_builder_config_identity():
  plain = builder_lib.TimelineBuilderConfig.make("movielens")
  core = builder_lib.TimelineBuilderConfig.make("movielens", kcore_users=5, kcore_items=5)
  assert core.name == "movielens_leave_last_out_kcore5-5"
  assert core.settings()["kcore_users"] == 5 and core.settings()["kcore_items"] == 5
  assert core.options().kcore_users == 5 and core.options().kcore_items == 5
  # Off (0 or a no-op 1) keeps the name and settings of preparations made before.
  for off in (0, 1):
    same = builder_lib.TimelineBuilderConfig.make("movielens", kcore_users=off,
                                                  kcore_items=off)
    assert same.name == plain.name and same.settings() == plain.settings()
  assert "kcore_users" not in plain.settings()
  assert builder_lib.TimelineBuilderConfig.make(
      "movielens", kcore_users=10).name == "movielens_leave_last_out_kcore10-0"


def test_prepare_dataset_with_kcore_and_reuse(tmp_path):
  raw = write_kcore_fixture(tmp_path / "raw")
  core = prepare.prepare_dataset("movielens", raw, tmp_path / "out", kcore_users=3,
                                 kcore_items=2, show_progress=False)
  plain = prepare.prepare_dataset("movielens", raw, tmp_path / "out", show_progress=False)
  assert core.path != plain.path and "kcore3-2" in core.path
  assert core.statistics["kcore"] == EXPECTED
  assert core.statistics["settings"]["kcore_users"] == 3
  assert core.statistics["records_per_split"] == {"train": 2, "validation": 2, "test": 2}
  assert plain.statistics["records_per_split"]["test"] == 3  # User 3 stays without k-core.
  again = prepare.prepare_dataset("movielens", raw, tmp_path / "out", kcore_users=3,
                                  kcore_items=2, show_progress=False)
  assert again.reused and again.path == core.path
  report = prepare.format_report(core.statistics)
  assert ("users >= 3, items >= 2 events: removed 2 users, 3 items, 5 events in 2 pass(es); "
          "left 2 users, 3 items, 6 events") in report


def test_cli_kcore_flags(tmp_path):
  raw = write_kcore_fixture(tmp_path / "raw")
  stats_file = tmp_path / "stats.json"
  proc = _run_cli("--dataset=movielens", f"--manual_dir={raw}", f"--data_dir={tmp_path / 'o'}",
                  "--kcore_users=3", "--kcore_items=2", f"--statistics_output={stats_file}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "k-core" in proc.stdout and "removed 2 users, 3 items, 5 events" in proc.stdout
  assert json.loads(stats_file.read_text())["kcore"] == EXPECTED


def test_real_ml_latest_small_5_core(shared_data, tmp_path):
  prepared = prepare.prepare_dataset("movielens", shared_data / "ml-latest-small",
                                     tmp_path / "out", kcore_users=5, kcore_items=5,
                                     show_progress=False)
  k = prepared.statistics["kcore"]
  assert (k["users_left"], k["items_left"], k["events_left"]) == (610, 3_650, 90_274)
  assert (k["users_removed"], k["items_removed"], k["events_removed"]) == (0, 6_074, 10_562)
  assert prepared.statistics["events_kept"] == 90_274
  assert prepared.vocabulary.num_items - schema.FIRST_ID <= 3_650
