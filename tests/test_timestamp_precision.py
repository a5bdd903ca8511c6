"""`timestamp_precision='float32'`: timestamps rounded as RecBole stores them.

RecBole keeps timestamps in a float32 column: seconds since 1970 become multiples of 128 s
(64 s before 2004), so the events of a rating session tie and keep the file's order (for
MovieLens: by movie id). The option reproduces those splits, to compare with RecBole's
figures on the same targets; the default keeps exact timestamps.
"""

import numpy as np
import pytest

from data_pipelines import builder as builder_lib
from data_pipelines import prepare, timelines
from data_pipelines.readers import make_reader
from tests import data_fixtures as fx
from user_llm_jax.data import schema

T0 = 1_500_000_000  # float32 spacing here is 128 s; T0 is a multiple of 128.
# User 1 rates movie 30 at T0 + 10 s, then movies 20 and 10 at T0 + 50 s and T0 + 60 s: in
# exact time 30, 20, 10; rounded, all three tie and keep file order (by movie id).
RATINGS = [(1, 10, 4.0, T0 + 60), (1, 20, 3.0, T0 + 50), (1, 30, 5.0, T0 + 10),
           (1, 40, 2.0, T0 + 1000), (2, 10, 4.0, T0), (2, 40, 3.0, T0 + 500),
           (2, 20, 1.0, T0 + 900)]
MOVIES = [(m, f"Movie {m} (2000)", ("Drama",)) for m in (10, 20, 30, 40)]


def test_round_timestamps_matches_a_float32_column():
  ts = np.array([0, 1, T0 + 63, T0 + 65, 2**40 + 12345], np.int64)
  np.testing.assert_array_equal(timelines.round_timestamps(ts, "exact"), ts)
  got = timelines.round_timestamps(ts, "float32")
  np.testing.assert_array_equal(got, ts.astype(np.float32).astype(np.int64))
  assert got[2] == T0 and got[3] == T0 + 128  # to the nearest multiple of 128 here


@pytest.mark.parametrize("precision,order", [("exact", ["30", "20", "10", "40"]),
                                             ("float32", ["10", "20", "30", "40"])])
def test_ties_after_rounding_keep_file_order(tmp_path, precision, order):
  fx.write_movielens_csv(tmp_path, ratings=RATINGS, movies=MOVIES)
  tl = timelines.build_timelines(
      make_reader("movielens", tmp_path),
      timelines.TimelineOptions(timestamp_precision=precision), show_progress=False)
  tests = {rec[schema.USER_ID]: rec for _, rec in tl.records("test")}
  # Items seen only in evaluation records are OOV in the vocabulary; each movie's
  # rating here is distinct, so the rating tokens tell the order.
  values = list(make_reader("movielens", tmp_path).rating_values)
  token = {str(m): values.index(r) + schema.FIRST_ID for _, m, r, _ in RATINGS[:4]}
  assert tests["1"][schema.RATINGS].tolist() == [token[m] for m in order]
  assert tl.statistics["options"]["timestamp_precision"] == precision
  if precision == "float32":
    assert set(tests["1"][schema.TIMESTAMPS][:3].tolist()) == {T0}


def test_option_is_validated_named_and_reused(tmp_path):
  with pytest.raises(ValueError, match="timestamp_precision must be one of"):
    timelines.TimelineOptions(timestamp_precision="float16")
  plain = builder_lib.TimelineBuilderConfig.make("movielens")
  rounded = builder_lib.TimelineBuilderConfig.make("movielens", timestamp_precision="float32")
  assert rounded.name == plain.name + "_tsfloat32"
  assert "timestamp_precision" not in plain.settings()  # old preparations still match
  assert rounded.options().timestamp_precision == "float32"
  raw = fx.write_movielens_csv(tmp_path / "raw", ratings=RATINGS, movies=MOVIES)
  first = prepare.prepare_dataset("movielens", raw, tmp_path / "out",
                                  timestamp_precision="float32", show_progress=False)
  again = prepare.prepare_dataset("movielens", raw, tmp_path / "out",
                                  timestamp_precision="float32", show_progress=False)
  assert again.reused and again.path == first.path and "tsfloat32" in first.path
  assert "rounded to float32" in prepare.format_report(first.statistics)


def test_beam_builder_refuses_the_option(tmp_path):
  pytest.importorskip("apache_beam", reason="the [beam] extra is not installed")
  from data_pipelines import beam_grouping  # pylint: disable=g-import-not-at-top
  config = builder_lib.TimelineBuilderConfig.make("movielens", timestamp_precision="float32")
  with pytest.raises(ValueError, match="in-memory builder only"):
    beam_grouping.build_splits(None, config, str(tmp_path), str(tmp_path))
