"""TFDS preparation, read-back with load_prepared, idempotency, failures, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import builder as builder_lib
from data_pipelines import prepare, timelines
from data_pipelines.readers import make_reader
from data_pipelines.records import BadInputError
from tests import data_fixtures as fx
from user_llm_jax.data import schema, source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("prep")
  return tmp, fx.prepare_synthetic(tmp, num_users=40, num_items=60, events_per_user_mean=15)


def test_read_back_equals_timelines(synthetic_prepared):
  tmp, prepared = synthetic_prepared
  assert not prepared.reused
  assert os.path.basename(os.path.dirname(prepared.path)) == "synthetic_leave_last_out"
  for f in ("dataset_info.json", schema.VOCAB_FILENAME, builder_lib.STATISTICS_FILENAME):
    assert os.path.exists(os.path.join(prepared.path, f))
  tl = timelines.build_timelines(make_reader("synthetic", tmp / "raw"),
                                 timelines.TimelineOptions(), show_progress=False)
  for split in ("train", "validation", "test"):
    src, vocab, stats = source.load_prepared(tmp / "prepared", split)
    assert len(src) == tl.num_records(split) == 40
    assert vocab == tl.vocabulary
    assert stats["records_per_split"][split] == 40
    for i, (_, expected) in enumerate(tl.records(split)):
      got = src[i]
      assert got[schema.USER_ID] == expected[schema.USER_ID].encode()
      for key in (schema.ITEM_IDS, schema.RATINGS, schema.TIMESTAMPS, schema.CATEGORY_IDS,
                  schema.CATEGORY_LENGTHS):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert got[key].dtype == expected[key].dtype
      assert int(got[schema.FAVORITE_CATEGORY]) == expected[schema.FAVORITE_CATEGORY]
      assert list(got[schema.REVIEW_TEXTS]) == [b""] * len(expected[schema.ITEM_IDS])
  # Under leave-last-out record i of every split is the same user, one event shorter.
  # Prepared and read back without TensorFlow (TFDS imports it only on demand).
  assert "tensorflow" not in sys.modules
  train, _, _ = source.load_prepared(prepared.path, "train")
  test, _, _ = source.load_prepared(prepared.path, "test")
  np.testing.assert_array_equal(train[3][schema.TIMESTAMPS], test[3][schema.TIMESTAMPS][:-2])


def test_prepare_is_idempotent(synthetic_prepared):
  tmp, first = synthetic_prepared
  info = os.path.join(first.path, "dataset_info.json")
  mtime = os.path.getmtime(info)
  again = prepare.prepare_dataset("synthetic", tmp / "raw", tmp / "prepared",
                                  show_progress=False)
  assert again.reused and again.path == first.path and os.path.getmtime(info) == mtime
  assert again.vocabulary == first.vocabulary
  # Changed raw files are noticed and the dataset is prepared again.
  ratings = tmp / "raw" / "ratings.csv"
  ratings.write_text(ratings.read_text())
  os.utime(ratings, ns=(1, 1))
  redone = prepare.prepare_dataset("synthetic", tmp / "raw", tmp / "prepared",
                                   show_progress=False)
  assert not redone.reused and redone.vocabulary == first.vocabulary


def test_paper_protocol_has_no_validation_split(synthetic_prepared):
  tmp, _ = synthetic_prepared
  paper = prepare.prepare_dataset("synthetic", tmp / "raw", tmp / "prepared", protocol="paper",
                                  window=8, show_progress=False)
  assert paper.splits == ["train", "test"]
  assert os.path.basename(os.path.dirname(paper.path)) == "synthetic_paper_w8_s1"
  src, _, stats = source.load_prepared(paper.path, "train")
  assert len(src) == stats["records_per_split"]["train"] > 40
  assert all(len(src[i][schema.ITEM_IDS]) == 9 for i in range(0, len(src), 17))
  with pytest.raises(KeyError, match="'validation' not in"):
    source.load_prepared(paper.path, "validation")
  with pytest.raises(FileNotFoundError, match="holds 2 prepared datasets"):
    source.load_prepared(tmp / "prepared", "test")


def test_failure_leaves_nothing_complete(tmp_path):
  raw = fx.write_movielens_csv(tmp_path / "raw", extra_ratings_lines=["1,2,x,3"])
  out = tmp_path / "out"
  with pytest.raises(BadInputError, match=r"ratings\.csv:13: rating 'x' is not a number"):
    prepare.prepare_dataset("movielens", raw, out, show_progress=False)
  found = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
  assert not [f for f in found if f.endswith(("dataset_info.json", schema.VOCAB_FILENAME,
                                               builder_lib.STATISTICS_FILENAME))]
  with pytest.raises(FileNotFoundError, match="no prepared dataset"):
    source.load_prepared(out, "train")
  # Tolerated: the bad line is counted and the dataset prepared.
  ok = prepare.prepare_dataset("movielens", raw, out, max_bad_fraction=0.1, show_progress=False)
  assert ok.statistics["bad_lines"]["bad_lines"] == 1
  assert ok.statistics["bad_lines"]["examples"] == [
      f"{raw / 'ratings.csv'}:13: rating 'x' is not a number"]
  assert ok.statistics["events_read"] == len(fx.RATINGS)
  assert "_bad0.1" in ok.path


def test_empty_result_is_an_error(tmp_path):
  raw = fx.write_movielens_csv(tmp_path / "raw")
  with pytest.raises(timelines.EmptyDatasetError, match="empty result"):
    prepare.prepare_dataset("movielens", raw, tmp_path / "out", protocol="paper",
                            show_progress=False)
  assert not list((tmp_path / "out").rglob("dataset_info.json"))


def test_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prepare.prepare_dataset("movielens", tmp_path / "missing", tmp_path / "out")
  with pytest.raises(ValueError, match="unknown dataset"):
    prepare.prepare_dataset("imdb", tmp_path, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    source.load_prepared(tmp_path / "nothing", "train")


def test_list_source():
  rec = {schema.ITEM_IDS: [2, 3], schema.RATINGS: [2, 2], schema.TIMESTAMPS: [1, 2],
         schema.CATEGORY_IDS: [4], schema.CATEGORY_LENGTHS: [1, 0], schema.USER_ID: "u"}
  src = source.ListSource([rec, rec])
  assert len(src) == 2 and src[1][schema.USER_ID] == b"u"
  assert src[0][schema.ITEM_IDS].dtype == np.int32
  assert list(src[0][schema.REVIEW_TEXTS]) == [b"", b""]
  assert src[0][schema.FAVORITE_CATEGORY] == schema.PAD_ID
  with pytest.raises(ValueError, match="category_lengths"):
    source.ListSource([{**rec, schema.CATEGORY_LENGTHS: [1, 1]}])


def _run_cli(*args):
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", "data_pipelines.prepare", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_malformed_line_exits_nonzero(tmp_path):
  raw = fx.write_movielens_csv(tmp_path / "raw", extra_ratings_lines=["1,2,3.5"])
  proc = _run_cli("--dataset=movielens", f"--manual_dir={raw}", f"--data_dir={tmp_path / 'o'}")
  assert proc.returncode == 1
  assert f"{raw / 'ratings.csv'}:13: expected 4 fields, found 3" in proc.stderr


def test_cli_real_ml_latest_small(shared_data, tmp_path):
  stats_file = tmp_path / "stats.json"
  proc = _run_cli("--dataset=movielens", f"--manual_dir={shared_data / 'ml-latest-small'}",
                  f"--data_dir={tmp_path / 'out'}", f"--statistics_output={stats_file}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "100,836" in proc.stdout and "610" in proc.stdout
  stats = json.loads(stats_file.read_text())
  assert stats["users_read"] == 610 and stats["events_read"] == 100_836
  assert stats["records_per_split"] == {"train": 610, "validation": 610, "test": 610}
  src, vocab, _ = source.load_prepared(tmp_path / "out", "test")
  assert len(src) == 610 and vocab.num_ratings == 12
  lengths = [len(src[i][schema.ITEM_IDS]) for i in range(len(src))]
  assert sum(lengths) == 100_836
