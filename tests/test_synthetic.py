"""The synthetic MovieLens-format generator: format, determinism, and learnable structure."""

import collections
import csv
import hashlib

import numpy as np
import pandas as pd
import pytest

from data_pipelines import synthetic, timelines
from data_pipelines.readers import make_reader
from user_llm_jax.data import schema


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  stats = synthetic.generate(out, num_users=400, num_items=1000, events_per_user_mean=60,
                             seed=3, show_progress=False)
  return out, stats


def test_format_matches_ml_latest_small(generated):
  out, stats = generated
  ratings = pd.read_csv(out / "ratings.csv")
  assert list(ratings.columns) == ["userId", "movieId", "rating", "timestamp"]
  assert len(ratings) == stats.num_ratings == 400 * 60
  assert set(ratings["rating"].unique()) <= {x / 2 for x in range(1, 11)}
  assert len(set(ratings["rating"].unique())) >= 8  # the scale is actually used
  # Sorted by user then movie, like the GroupLens file.
  keys = list(zip(ratings["userId"], ratings["movieId"]))
  assert keys == sorted(keys)
  assert (ratings.groupby("userId").size() >= 20).all()
  first = (out / "ratings.csv").read_text().splitlines()[1]
  assert first.split(",")[2] in {f"{x / 2:.1f}" for x in range(1, 11)}  # e.g. "4.0"
  with open(out / "movies.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["movieId", "title", "genres"]
  assert len(rows) == 1001 and all(len(r) == 3 for r in rows)
  assert all(r[1][-7:-5] == " (" and r[1][-5:-1].isdigit() and r[1][-1] == ")"
             for r in rows[1:])  # "Title (Year)"
  assert any("," in r[1] for r in rows[1:])  # some titles need quoting
  assert '"' in (out / "movies.csv").read_text()


def test_one_to_three_genres(generated):
  out, _ = generated
  movies = pd.read_csv(out / "movies.csv")
  counts = movies["genres"].str.split("|").map(len)
  assert set(counts) == {1, 2, 3}
  names = set(g for gs in movies["genres"].str.split("|") for g in gs)
  assert names <= set(synthetic.GENRES) and len(names) >= 15


def test_power_law_popularity(generated):
  out, stats = generated
  ratings = pd.read_csv(out / "ratings.csv")
  counts = np.sort(ratings["movieId"].value_counts().to_numpy())[::-1]
  # Zipf(1): the top 1% of items gets far more than 1% of the ratings ...
  assert stats.top1pct_item_share > 0.08
  # ... and log(count) falls roughly linearly with log(rank).
  ranks = np.arange(1, 101)
  slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
  assert -1.4 < slope < -0.5


def test_timestamps_strictly_increase_per_user(generated):
  out, _ = generated
  ratings = pd.read_csv(out / "ratings.csv").sort_values(["userId", "timestamp"])
  gaps = ratings.groupby("userId")["timestamp"].diff().dropna()
  assert (gaps > 0).all()


def test_deterministic(tmp_path):
  kwargs = dict(num_users=50, num_items=100, events_per_user_mean=25, show_progress=False)
  synthetic.generate(tmp_path / "a", seed=7, **kwargs)
  synthetic.generate(tmp_path / "b", seed=7, **kwargs)
  synthetic.generate(tmp_path / "c", seed=8, **kwargs)
  for name in ("ratings.csv", "movies.csv"):
    assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
  assert _digest(tmp_path / "a" / "ratings.csv") != _digest(tmp_path / "c" / "ratings.csv")


def test_exact_num_ratings_and_chunking(tmp_path):
  stats = synthetic.generate(tmp_path, num_users=33, num_items=50, num_ratings=1234,
                             users_per_chunk=10, min_events_per_user=5, show_progress=False)
  assert stats.num_ratings == 1234
  assert len(pd.read_csv(tmp_path / "ratings.csv")) == 1234
  assert not (tmp_path / "ratings.csv.tmp").exists()
  with pytest.raises(ValueError, match="below num_users"):
    synthetic.generate(tmp_path, num_users=10, num_items=50, num_ratings=20,
                       show_progress=False)


def test_readable_by_movielens_reader_and_learnable(generated):
  out, _ = generated
  reader = make_reader("synthetic", out)
  assert reader.layout == "csv" and reader.name == "synthetic"
  tl = timelines.build_timelines(reader, timelines.TimelineOptions(), show_progress=False)
  assert tl.statistics["users_read"] == 400 and tl.statistics["events_read"] == 24_000
  assert tl.statistics["items_without_metadata"] == 0
  # Next-item structure a sequence model can use and popularity cannot: a
  # first-order transition model fitted on train records beats popularity on
  # test Recall@10 by a wide margin.
  train = [r[schema.ITEM_IDS] for _, r in tl.records("train")]
  test = [r[schema.ITEM_IDS] for _, r in tl.records("test")]
  popularity = collections.Counter(i for seq in train for i in seq)
  top10 = [i for i, _ in popularity.most_common(10)]
  transitions = collections.defaultdict(collections.Counter)
  for seq in train:
    for a, b in zip(seq[:-1], seq[1:]):
      transitions[a][b] += 1
  hits_pop = hits_markov = 0
  for seq in test:
    target, last = seq[-1], seq[-2]
    hits_pop += target in top10
    ranked = [i for i, _ in transitions[last].most_common(10)]
    ranked += [i for i in top10 if i not in ranked][:10 - len(ranked)]
    hits_markov += target in ranked
  recall_pop, recall_markov = hits_pop / len(test), hits_markov / len(test)
  print(f"synthetic test Recall@10: transitions {recall_markov:.3f}, popularity {recall_pop:.3f}")
  assert recall_markov > recall_pop + 0.1, (recall_markov, recall_pop)


def test_cli(tmp_path):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "data_pipelines.synthetic", f"--out_dir={tmp_path}",
       "--num_users=30", "--num_items=40", "--num_ratings=900"],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-1000:]
  assert "wrote 900 ratings of 30 users" in proc.stdout
  assert len(pd.read_csv(tmp_path / "ratings.csv")) == 900
