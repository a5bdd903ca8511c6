"""Beam per-user grouping equals the in-memory timeline builder (DirectRunner engine)."""

import collections
import glob
import gzip
import json
import pathlib

import numpy as np
import pytest

beam = pytest.importorskip(
    "apache_beam", reason="apache_beam not installed (optional extra: pip install -e .[beam])")

import tensorflow_datasets as tfds  # noqa: E402

from data_pipelines import beam_grouping  # noqa: E402
from data_pipelines import builder as builder_lib  # noqa: E402
from data_pipelines import prepare  # noqa: E402
from data_pipelines.readers import make_reader  # noqa: E402
from data_pipelines.records import RawEvent  # noqa: E402
from data_pipelines.timelines import TimelineOptions, build_timelines  # noqa: E402
from tests import data_fixtures as fx  # noqa: E402
from user_llm_jax.data import schema  # noqa: E402

OOV = "<oov>"


def _gz(path: pathlib.Path, lines: list[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _amazon_review(user, item, t, rating, text):
  return json.dumps({"reviewerID": user, "asin": item, "overall": rating,
                     "unixReviewTime": t, "reviewText": text, "summary": f"s-{text}"})


def amazon_fixture(root: pathlib.Path, num_users: int = 12, seed: int = 0) -> pathlib.Path:
  """Two categories; timestamp ties within and across files; exact repeated reviews."""
  rng = np.random.default_rng(seed)
  for cat in ("Books", "Toys"):
    lines = []
    for u in range(num_users):
      for _ in range(int(rng.integers(1, 7))):
        t = int(rng.integers(0, 6)) * 100  # Few distinct times: many ties.
        line = _amazon_review(f"U{u}", f"{cat[0]}{int(rng.integers(0, 8))}", t,
                              float(rng.integers(1, 6)), f"r{len(lines)}")
        lines.append(line)
        if rng.random() < 0.25:
          lines.append(line)  # Exact repeat, as in the 2018 5-core files.
    order = rng.permutation(len(lines))
    _gz(root / cat / f"{cat}_5.json.gz", [lines[i] for i in order])
  _gz(root / "Books" / "meta_Books.json.gz",
      [json.dumps({"asin": f"B{i}", "title": f"Book {i}", "category": ["Books", "Novels"]})
       for i in range(8)])
  return root


def google_fixture(root: pathlib.Path) -> pathlib.Path:
  rows = {"Hawaii": [("1", "0xA", 1_000_999, 5, None), ("2", "0xA", 2_000_000, 4, "ok"),
                     ("1", "0xB", 1_000_000, 3, "tie"), ("1", "0xA", 1_000_999, 5, None),
                     ("1", "0xC", 3_000_000, 2, "x"), ("2", "0xB", 500, 1, "y")],
          "Vermont": [("1", "0xD", 1_000_000, 5, "tie2"), ("2", "0xD", 9_000_000, 4, "z"),
                      ("2", "0xA", 9_000_000, 3, "w")]}
  for state, rs in rows.items():
    _gz(root / f"review-{state}.json.gz",
        [json.dumps({"user_id": u, "gmap_id": g, "time": t, "rating": r, "text": x,
                     "name": "n", "pics": None, "resp": None}) for u, g, t, r, x in rs])
  _gz(root / "meta-Hawaii.json.gz",
      [json.dumps({"gmap_id": "0xA", "name": "Cafe", "category": ["Cafe", "Bakery"]})])
  return root


def movielens_fixture(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  (root / "ratings.csv").write_text(
      "userId,movieId,rating,timestamp\n1,10,4.0,5\n1,11,3.5,5\n1,12,5.0,1\n2,10,1.0,3\n"
      "2,12,2.0,3\n2,11,4.5,9\n2,10,1.0,3\n1,10,0.5,7\n")
  (root / "movies.csv").write_text(
      "movieId,title,genres\n10,A (1990),Drama\n11,B (1991),Comedy|Drama\n12,C (1992),Horror\n")
  return root


def core_timelines(manual_dir, dataset, **options):
  """Per-user (item or OOV, rating, timestamp, text, summary) lists from the core builder."""
  reader = make_reader(dataset, manual_dir, **options)
  t = build_timelines(reader, TimelineOptions(protocol="leave_last_out"), show_progress=False)
  raw = {i: it.raw_id for i, it in enumerate(t.vocabulary.items) if i >= schema.FIRST_ID}
  out = collections.defaultdict(list)
  for n in range(len(t.event_user)):
    item = int(t.event_item[n])
    out[t.user_raw[t.event_user[n]]].append((
        raw.get(item, OOV), t.vocabulary.ratings[int(t.event_rating[n])],
        int(t.event_ts[n]),
        t.event_text[n] if t.event_text is not None else "",
        t.event_summary[n] if t.event_summary is not None else ""))
  return dict(out), set(raw.values()), t.statistics


def beam_timelines(tmp_path, manual_dir, dataset, pipeline_args=(), **options):
  prefix = str(tmp_path / "out" / "timelines")
  stats = beam_grouping.run(dataset, str(manual_dir), prefix, reader_options=options,
                            pipeline_args=pipeline_args)
  out = {}
  for path in sorted(glob.glob(prefix + "-*.jsonl.gz")):
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for line in f:
        user, events = beam_grouping.timeline_from_json(line)
        assert user not in out, f"user {user} emitted twice"
        out[user] = events
  return out, stats


@pytest.mark.parametrize("dataset, make, options, runner", [
    ("amazon", amazon_fixture, {}, []),  # Default: the DirectRunner's in-process engine.
    ("amazon", amazon_fixture, {"categories": "Books"}, ["--runner=BundleBasedDirectRunner"]),
    ("google_local", google_fixture, {}, []),
    ("movielens", movielens_fixture, {}, []),  # A reader without shards: one shard.
])
def test_beam_timelines_equal_in_memory_core(tmp_path, dataset, make, options, runner):
  manual_dir = make(tmp_path / "raw")
  core, vocab_items, core_stats = core_timelines(manual_dir, dataset, **options)
  grouped, stats = beam_timelines(tmp_path, manual_dir, dataset, runner, **options)
  as_core = {user: [(e.item if e.item in vocab_items else OOV, e.rating, e.timestamp,
                     e.review_text, e.review_summary) for e in events]
             for user, events in grouped.items()}
  assert as_core == core
  assert stats["duplicate_events_dropped"] == core_stats["duplicate_events"]
  assert stats["events_read"] == core_stats["events_read"]
  # Beam reads review lines only (metadata is the builder's side input).
  assert stats["lines_read"] == stats["events_read"] and stats["bad_lines"] == 0
  assert stats["users"] == core_stats["users_read"] == len(grouped)
  assert stats["events_kept"] == core_stats["events_after_dedup"]
  if dataset == "amazon":
    assert stats["duplicate_events_dropped"] > 0  # The fixture really has repeats.


def _prepare(config: dict, dataset, manual_dir, data_dir, beam_pipeline_options=None):
  """Prepares through the CLI's API (in memory, or on Beam with pipeline options)."""
  prepared = prepare.prepare_dataset(dataset, manual_dir, data_dir, show_progress=False,
                                     beam_pipeline_options=beam_pipeline_options, **config)
  side = {name: json.loads((pathlib.Path(prepared.path) / name).read_text())
          for name in (schema.VOCAB_FILENAME, builder_lib.STATISTICS_FILENAME)}
  return tfds.builder_from_directory(prepared.path).as_data_source(), side


@pytest.mark.parametrize("dataset, make, config", [
    ("amazon", amazon_fixture, {"protocol": "leave_last_out"}),
    ("google_local", google_fixture, {"protocol": "paper", "window": 2,
                                      "min_item_count": 2}),
    ("movielens", movielens_fixture, {"protocol": "paper", "window": 1, "stride": 2}),
    # k-core on text events with exact repeats (de-duplicated before the filter).
    ("amazon", amazon_fixture, {"protocol": "leave_last_out", "kcore_users": 5,
                                "kcore_items": 5}),  # Removes 1 user, 3 items.
])
def test_beam_builder_writes_the_same_dataset(tmp_path, dataset, make, config):
  _assert_same_dataset(tmp_path, dataset, make(tmp_path / "raw"), config)


def _assert_same_dataset(tmp_path, dataset, manual_dir, config) -> dict:
  """Prepares in memory and on Beam, asserts equal outputs; returns the vocabulary JSON."""
  mem, mem_side = _prepare(config, dataset, manual_dir, tmp_path / "mem")
  par, par_side = _prepare(config, dataset, manual_dir, tmp_path / "beam", [])
  splits = builder_lib.TimelineBuilderConfig.make(dataset, **config).options().splits
  assert set(mem) == set(par) == set(splits)
  for split in mem:
    assert len(mem[split]) == len(par[split]) > 0
    for i in range(len(mem[split])):
      a, b = mem[split][i], par[split][i]
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]),
                                      err_msg=f"{split}[{i}].{key}")
  vocab, beam_vocab = mem_side[schema.VOCAB_FILENAME], par_side[schema.VOCAB_FILENAME]
  for key in ("dataset", "items", "ratings", "categories"):
    assert vocab[key] == beam_vocab[key], key
  stats, beam_stats = (mem_side[builder_lib.STATISTICS_FILENAME],
                       par_side[builder_lib.STATISTICS_FILENAME])
  assert stats["drops"]["counts"] == beam_stats["drops"]["counts"]
  assert beam_stats["source"]["engine"] == "apache_beam"
  timing = {"seconds_timelines", "seconds_total", "events_per_second", "records_per_second"}
  for key in set(stats) - {"drops", "source"} - timing:
    assert stats[key] == beam_stats[key], key
  return vocab


@pytest.mark.parametrize("window, stride, n, covered", [
    (2, 2, 6, [1, 2, 3]),  # The leading event is in no train window.
    (1, 4, 11, [1, 2, 5, 6]),  # Neither are the gaps between windows.
])
def test_beam_vocabulary_counts_only_events_a_train_record_covers(tmp_path, window, stride,
                                                                   n, covered):
  manual_dir = fx.write_one_user_timeline(tmp_path / "raw", n)
  config = {"protocol": "paper", "window": window, "stride": stride}
  vocab = _assert_same_dataset(tmp_path, "movielens", manual_dir, config)
  assert [row[0] for row in vocab["items"][schema.FIRST_ID:]] == [str(100 + k) for k in covered]


def test_order_timeline_keeps_first_duplicate_and_read_order_on_ties():
  def ev(item, t, row, text="x"):
    return RawEvent("u", item, 5.0, t, row, text)
  keyed = [(7, 1, 0, ev("c", 7, 0)), (5, 0, 3, ev("b", 5, 3)), (5, 0, 1, ev("a", 5, 1)),
           (5, 1, 0, ev("d", 5, 0)), (5, 0, 2, ev("a", 5, 2))]
  timeline, dropped = beam_grouping.order_timeline(keyed)
  assert [(e.item, e.row) for e in timeline] == [("a", 1), ("b", 3), ("d", 0), ("c", 0)]
  assert dropped == 1


def test_bad_line_fails_pipeline_with_file_and_line(tmp_path):
  path = tmp_path / "raw" / "Books_5.json.gz"
  _gz(path, [_amazon_review("U", "I", 1, 5.0, "a"), "{broken", _amazon_review("U", "J", 2,
                                                                               4.0, "b")])
  with pytest.raises(Exception, match=rf"{path}:2"):
    beam_grouping.run("amazon", str(tmp_path / "raw"), str(tmp_path / "out" / "t"))
  stats = beam_grouping.run("amazon", str(tmp_path / "raw"), str(tmp_path / "out2" / "t"),
                            max_bad_fraction=0.5)
  assert (stats["bad_lines"], stats["lines_read"], stats["events_read"]) == (1, 3, 2)
  assert stats["bad_examples"][0].startswith(f"{path}:2: not a valid JSON record")
  with pytest.raises(Exception, match="lines are malformed"):
    beam_grouping.run("amazon", str(tmp_path / "raw"), str(tmp_path / "out3" / "t"),
                      max_bad_fraction=0.1)


def test_missing_input_fails_before_the_pipeline(tmp_path):
  (tmp_path / "raw").mkdir()
  with pytest.raises(FileNotFoundError, match="no Amazon review file"):
    beam_grouping.GroupTimelines("amazon", str(tmp_path / "raw"))


def test_beam_kcore_equals_in_memory(tmp_path):
  from tests import test_kcore

  manual_dir = test_kcore.write_kcore_fixture(tmp_path / "raw")
  _assert_same_dataset(tmp_path, "movielens", manual_dir, {"kcore_users": 3, "kcore_items": 2})
  stats = json.loads(next((tmp_path / "beam").rglob(builder_lib.STATISTICS_FILENAME))
                     .read_text())
  assert stats["kcore"] == test_kcore.EXPECTED


def test_beam_kcore_that_needs_more_passes_than_unrolled_fails(tmp_path, monkeypatch):
  from tests import test_kcore

  monkeypatch.setattr(beam_grouping, "KCORE_MAX_ROUNDS", 2)  # The fixture needs 3 passes.
  manual_dir = test_kcore.write_kcore_fixture(tmp_path / "raw")
  with pytest.raises(Exception, match="KCORE_MAX_ROUNDS, or prepare in memory"):
    _prepare({"kcore_users": 3, "kcore_items": 2}, "movielens", manual_dir, tmp_path / "b", [])
  monkeypatch.setattr(beam_grouping, "KCORE_MAX_ROUNDS", 3)
  _, side = _prepare({"kcore_users": 3, "kcore_items": 2}, "movielens", manual_dir,
                     tmp_path / "c", [])
  assert side[builder_lib.STATISTICS_FILENAME]["kcore"]["rounds"] == 2
