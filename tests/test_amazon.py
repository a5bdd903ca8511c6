"""Amazon Review reader: both releases' real line formats, bad input, category selection."""

import gzip
import json
import os
import pathlib
import re

import numpy as np
import pytest

from data_pipelines import amazon
from data_pipelines.readers import BadLineTracker, make_reader
from data_pipelines.records import BadInputError, RawItem


def write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def review18(user, asin, t, rating=5.0, text="Great.", summary="Five Stars", **extra):
  rec = {"overall": rating, "verified": True, "reviewTime": "09 4, 2015",
         "reviewerID": user, "asin": asin, "reviewerName": "X", "reviewText": text,
         "summary": summary, "unixReviewTime": t, **extra}
  return json.dumps(rec)


# 2018 5-core: line 2 repeats line 1 except for the product style (as in the real dumps).
REVIEWS_2018 = [
    review18("U1", "A1", 100, style={"Size:": " Big"}),
    review18("U1", "A1", 100, style={"Size:": " Small"}),
    review18("U2", "A2", 50, rating=3.0, text="Meh", summary="ok"),
    json.dumps({"overall": 4.0, "reviewerID": "U1", "asin": "A2", "unixReviewTime": 90}),
]
META_2018 = [
    json.dumps({"asin": "A1", "title": "  Maggiano&#39;s <b>Gift</b>   Card ",
                "category": ["Gift Cards", "Gift Cards", "No expiration, no fees.",
                             "Starbucks"]}),
    json.dumps({"asin": "A2", "title": "Box", "category": ["Gift Cards",
                                                         "Gift Card Accessories"]}),
    json.dumps({"asin": "A1", "title": "Maggiano's Gift Card", "category": ["Gift Cards"]}),
    json.dumps({"asin": "A3", "category": []}),
    json.dumps({"asin": "A4", "title": "X", "category": ["Gift Cards", "</span></span>",
                                                       "Tail"]}),
]
# 2014 release: reviews are JSON lines, metadata Python-literal dicts (single quotes, None).
REVIEWS_2014 = [
    json.dumps({"reviewerID": "V1", "asin": "0000031852", "overall": 2.0,
                "unixReviewTime": 1382140800, "reviewText": "Too small", "summary": "No"}),
    json.dumps({"reviewerID": "V1", "asin": "0000031853", "overall": 4.0,
                "unixReviewTime": 1382140700, "reviewText": "Nice", "summary": "Yes"}),
]
META_2014 = [
    "{'asin': '0000031852', 'title': \"Girls' Ballet Tutu Zebra Hot Pink\", 'price': 3.17, "
    "'salesRank': {'Sports &amp; Outdoors': 8547}, 'imUrl': None, "
    "'categories': [['Sports & Outdoors', 'Other Sports', 'Dance'], ['Clothing', 'Girls']]}",
    "{'asin': '0000031853', 'related': {'also_bought': ['B00JHONN1S']}, "
    "'categories': [['Clothing, Shoes & Jewelry', 'Girls', 'Clothing', 'Active']]}",
]


@pytest.fixture
def dump(tmp_path) -> pathlib.Path:
  """A manual_dir with a 2018 category (with meta), a 2014 category and one without meta."""
  write_lines(tmp_path / "Gift_Cards" / "Gift_Cards_5.json.gz", REVIEWS_2018)
  write_lines(tmp_path / "Gift_Cards" / "meta_Gift_Cards.json.gz", META_2018)
  write_lines(tmp_path / "old" / "reviews_Toys_5.json.gz", REVIEWS_2014)
  write_lines(tmp_path / "old" / "meta_Toys.json.gz", META_2014)
  write_lines(tmp_path / "All_Beauty" / "All_Beauty_5.json.gz",
              [review18("U9", "B1", 7), review18("U1", "B1", 8)])
  (tmp_path / "All_Beauty" / "SOURCE.txt").write_text("not a data file\n")
  return tmp_path


def test_discover_pairs_reviews_and_meta_per_category(dump):
  files = {f.category: f for f in amazon.discover(str(dump))}
  assert sorted(files) == ["All_Beauty", "Gift_Cards", "Toys"]
  assert files["Toys"].release == "2014" and files["Gift_Cards"].release == "2018"
  assert files["All_Beauty"].meta is None
  assert files["Gift_Cards"].meta.endswith("meta_Gift_Cards.json.gz")
  assert all(f.five_core for f in files.values())


def test_events_keep_every_row_in_file_order_with_text(dump):
  reader = amazon.AmazonReader(dump)
  events = list(reader.events())
  # Files in category order: All_Beauty (2), Gift_Cards (4), Toys (2); duplicates are kept
  # for the builder, which drops and counts them once.
  assert [e.row for e in events] == list(range(8))
  assert [(e.user, e.item, e.timestamp) for e in events[2:4]] == [("U1", "A1", 100)] * 2
  no_text = events[5]
  assert (no_text.item, no_text.rating, no_text.review_text, no_text.review_summary) == (
      "A2", 4.0, "", "")
  assert events[4].review_summary == "ok" and events[4].rating == 3.0
  assert reader.tracker.lines_read == 8 and reader.tracker.bad_count == 0
  assert reader.counts["reviews_without_text"] == 1


def test_items_leaf_category_clean_title_both_releases(dump):
  reader = amazon.AmazonReader(dump)
  items = list(reader.items())
  by_id = {}
  for it in items:  # Repeated asins are yielded; first occurrence shown here.
    by_id.setdefault(it.item, it)
  assert len(items) == 7
  assert by_id["A1"] == RawItem("A1", "Maggiano's Gift Card", ("Gift Cards",))
  assert by_id["A2"].categories == ("Gift Card Accessories",)
  assert by_id["A3"] == RawItem("A3", "", ())
  assert by_id["A4"].categories == ("Gift Cards",)  # Cut at the HTML fragment.
  # 2014: deepest leaf of the *first* path; Python literal with quotes and None parsed.
  assert by_id["0000031852"] == RawItem("0000031852", "Girls' Ballet Tutu Zebra Hot Pink",
                                        ("Dance",))
  assert by_id["0000031853"] == RawItem("0000031853", "", ("Active",))
  assert reader.counts["meta_records_without_title"] == 2
  assert reader.counts["meta_category_paths_cut"] == 2
  assert reader.counts["categories_without_meta_file"] == 1


def test_category_selection_and_unknown_category(dump):
  reader = amazon.AmazonReader(dump, categories="Toys")
  assert [e.item for e in reader.events()] == ["0000031852", "0000031853"]
  assert len(list(amazon.AmazonReader(dump, categories=["Toys", "All_Beauty"]).events())) == 4
  with pytest.raises(FileNotFoundError, match=r"\['Nope'\] not found.*All_Beauty, Gift_Cards"):
    amazon.AmazonReader(dump, categories=["Nope"])


@pytest.mark.parametrize("value", ["Toys,All_Beauty", "Toys; All_Beauty",
                                   str(["Toys", "All_Beauty"]), ("Toys", "All_Beauty")])
def test_category_option_forms(dump, value):
  reader = amazon.AmazonReader(dump, categories=value)
  assert [f.category for f in reader.files] == ["All_Beauty", "Toys"]


def test_registry_builds_the_reader(dump):
  reader = make_reader("amazon", dump, categories="Gift_Cards")
  assert isinstance(reader, amazon.AmazonReader)
  assert reader.rating_values == (1.0, 2.0, 3.0, 4.0, 5.0) and reader.has_text
  assert reader.describe()["categories"]["Gift_Cards"]["meta"] == "meta_Gift_Cards.json.gz"


def test_subset_prefers_5core_and_full_can_be_chosen(tmp_path):
  write_lines(tmp_path / "Books_5.json.gz", [review18("U", "I", 1)])
  write_lines(tmp_path / "Books.json.gz", [review18("U", "I", 1), review18("W", "I", 2)])
  assert len(list(amazon.AmazonReader(tmp_path).events())) == 1
  assert len(list(amazon.AmazonReader(tmp_path, subset="full").events())) == 2


def test_whole_2018_dump_file_names(tmp_path):
  write_lines(tmp_path / "All_Amazon_Review_5.json.gz", [review18("U", "I", 1)])
  write_lines(tmp_path / "All_Amazon_Meta.json.gz",
              [json.dumps({"asin": "I", "title": "T", "category": ["Books", "Poetry"]})])
  (files,) = amazon.discover(str(tmp_path))
  assert (files.category, files.five_core) == ("All_Amazon", True)
  assert files.meta.endswith("All_Amazon_Meta.json.gz")
  reader = amazon.AmazonReader(tmp_path)
  assert [e.item for e in reader.events()] == ["I"]
  assert list(reader.items()) == [RawItem("I", "T", ("Poetry",))]


def test_two_releases_of_one_category_is_an_error(tmp_path):
  write_lines(tmp_path / "a" / "Books_5.json.gz", [review18("U", "I", 1)])
  write_lines(tmp_path / "b" / "reviews_Books_5.json.gz", [review18("U", "I", 1)])
  with pytest.raises(BadInputError, match="several review files"):
    amazon.AmazonReader(tmp_path)


def test_python_literal_reviews_are_detected_too(tmp_path):
  write_lines(tmp_path / "reviews_Toys_5.json.gz", [
      "{'reviewerID': 'V1', 'asin': 'X', 'overall': 5.0, 'unixReviewTime': 3, "
      "'reviewText': \"It's fine\", 'summary': None}"])
  (event,) = amazon.AmazonReader(tmp_path).events()
  assert (event.review_text, event.review_summary) == ("It's fine", "")
  assert amazon.sniff_format(str(tmp_path / "reviews_Toys_5.json.gz")) == amazon.FORMAT_PYTHON


def test_python_literal_never_evaluates_code(tmp_path):
  marker = tmp_path / "pwned"
  write_lines(tmp_path / "meta_Toys.json.gz", [
      "{'asin': 'A', 'title': 'ok'}",
      f"__import__('pathlib').Path({str(marker)!r}).touch()"])
  write_lines(tmp_path / "reviews_Toys_5.json.gz", [review18("U", "A", 1)])
  reader = amazon.AmazonReader(tmp_path, tracker=BadLineTracker(max_bad_fraction=1.0))
  assert [i.item for i in reader.items()] == ["A"]
  assert not marker.exists()
  assert reader.tracker.examples[0].line == 2


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "not a valid JSON record"),
    (json.dumps({"reviewerID": "U", "overall": 5.0, "unixReviewTime": 1}),
     "missing required field 'asin'"),
    (json.dumps({"reviewerID": "U", "asin": "A", "overall": 7.0, "unixReviewTime": 1}),
     r"overall=7.0 is not one of"),
    (json.dumps({"reviewerID": "U", "asin": "A", "overall": "five", "unixReviewTime": 1}),
     "expected numbers"),
    ("[1, 2]", "expected an object/dict, got list"),
])
def test_bad_line_names_file_line_and_reason(tmp_path, bad_line, reason):
  path = write_lines(tmp_path / "Books_5.json.gz",
                     [review18("U", "I", 1), review18("U", "J", 2), bad_line,
                      review18("U", "K", 3)])
  with pytest.raises(BadInputError, match=rf"{path}:3: .*{reason}"):
    list(amazon.AmazonReader(tmp_path).events())
  # Tolerated: the bad line is counted and the others are read.
  reader = amazon.AmazonReader(tmp_path, tracker=BadLineTracker(max_bad_fraction=0.5))
  assert [e.item for e in reader.events()] == ["I", "J", "K"]
  assert (reader.tracker.bad_count, reader.tracker.lines_read) == (1, 4)
  assert reader.tracker.examples[0].line == 3


def test_missing_asin_in_meta_is_a_bad_line(tmp_path):
  write_lines(tmp_path / "Books_5.json.gz", [review18("U", "I", 1)])
  meta = write_lines(tmp_path / "meta_Books.json.gz", [json.dumps({"title": "T"})])
  with pytest.raises(BadInputError, match=rf"{meta}:1: missing required field 'asin'"):
    list(amazon.AmazonReader(tmp_path).items())


def test_truncated_gzip_is_a_clear_error_naming_the_file(tmp_path):
  path = write_lines(tmp_path / "Books_5.json.gz",
                     [review18(f"U{i}", f"I{i}", i, text="word " * 50) for i in range(300)])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(BadInputError, match=rf"{path}: truncated or corrupt gzip"):
    list(amazon.AmazonReader(tmp_path).events())


def test_invalid_utf8_is_a_bad_line(tmp_path):
  path = tmp_path / "Books_5.json.gz"
  with gzip.open(path, "wb") as f:
    f.write(review18("U", "I", 1).encode() + b"\n" + b'{"reviewerID": "\xff"}\n')
  with pytest.raises(BadInputError, match=rf"{path}:2: not valid UTF-8"):
    list(amazon.AmazonReader(tmp_path).events())


def test_no_review_file_is_a_clear_error(tmp_path):
  write_lines(tmp_path / "meta_Books.json.gz", [json.dumps({"asin": "A"})])
  with pytest.raises(FileNotFoundError, match="no Amazon review file"):
    amazon.AmazonReader(tmp_path)


def test_real_categories(shared_data):
  root = shared_data / "amazon"
  if not root.exists():
    pytest.skip(f"{root} not found")
  reader = amazon.AmazonReader(root)
  counts = {}
  for e in reader.events():
    counts[e.item] = counts.get(e.item, 0) + 1
  # Published 5-core line counts: 3,176 + 5,269 + 2,972 (see each SOURCE.txt).
  assert reader.tracker.lines_read == 11_417 and reader.tracker.bad_count == 0
  items = list(reader.items())
  assert len(items) == 1_547 == len({i.item for i in items})
  assert {c for i in items for c in i.categories} == {"Gift Cards", "Gift Card Accessories"}
  assert not any("&#39;" in i.title or i.title != i.title.strip() for i in items)
  assert reader.counts["categories_without_meta_file"] == 2
  assert os.path.basename(reader.source_files()[-1]) == "meta_Gift_Cards.json.gz"


def test_timeline_builder_counts_duplicates_once(dump):
  """Reader yields repeats; the common builder drops and counts them exactly once."""
  from data_pipelines.timelines import TimelineOptions, build_timelines

  reader = amazon.AmazonReader(dump)
  t = build_timelines(reader, TimelineOptions("leave_last_out"), show_progress=False)
  s = t.statistics
  assert (s["events_read"], s["duplicate_events"], s["events_after_dedup"]) == (8, 1, 7)
  assert s["drops"]["counts"]["duplicate_item_metadata"] == 1  # Second A1 record.
  assert s["source"]["reader_counts"]["meta_category_paths_cut"] == 2
  # U1 (B1 at t=8, A2 at 90, A1 twice at 100) is the one user with >= 3 events; its train
  # part is B1 alone, an All_Beauty item without metadata: its title falls back to the asin.
  assert [(it.raw_id, it.title) for it in t.vocabulary.items[2:]] == [("B1", "B1")]
  assert s["items_without_metadata"] == 1 and t.vocabulary.categories[2:] == ()
  assert s["users_read"] == 4 and s["users_kept"] == 1
  assert s["rating_values"] == [1.0, 2.0, 3.0, 4.0, 5.0]


# Lines that take every path of the columnar reader: blank lines, padded and null text,
# types pyarrow rejects but the per-line reader accepts (string rating, numeric user id,
# float time), malformed JSON, missing fields, off-scale rating, two objects on one line
# and invalid UTF-8.
MIXED_LINES = [
    review18("U1", "A", 5), "", "   ", review18("U2", "B", 6, text="  padded  "),
    json.dumps({"reviewerID": "U3", "asin": "C", "overall": 2.0, "unixReviewTime": 7,
                "reviewText": None}),
    json.dumps({"reviewerID": "U4", "asin": "D", "overall": "4.0", "unixReviewTime": 8}),
    json.dumps({"reviewerID": 123, "asin": "E", "overall": 1.0, "unixReviewTime": 9}),
    json.dumps({"reviewerID": "U5", "asin": "F", "overall": 3.0, "unixReviewTime": 1.5e9}),
    "{broken", json.dumps({"reviewerID": "U6", "overall": 5.0, "unixReviewTime": 1}),
    review18("U7", "G", 10, rating=0.0), review18("U8", "H", 11) + " " + review18("U8", "I", 12),
    review18("U9", "J", 13), review18("U9", "K", 14, summary=None),
]


@pytest.mark.parametrize("chunk_size", [1, 3, 1 << 16])
def test_columnar_chunks_equal_per_line_events(tmp_path, chunk_size):
  path = tmp_path / "Books_5.json.gz"
  write_lines(path, MIXED_LINES[:12])
  with gzip.open(path, "ab") as f:
    f.write(b'{"reviewerID": "\xff"}\n' + "\n".join(MIXED_LINES[12:]).encode())  # No final \n.
  per_line = amazon.AmazonReader(tmp_path, tracker=BadLineTracker(1.0))
  expected = [(e.user, e.item, e.rating, e.timestamp, e.review_text, e.review_summary)
              for e in per_line.events()]
  columnar = amazon.AmazonReader(tmp_path, tracker=BadLineTracker(1.0))
  got = []
  for chunk in columnar.event_chunks(chunk_size=chunk_size):
    assert chunk.timestamps.dtype == np.int64 and chunk.ratings.dtype == np.float64
    got += zip(chunk.users.tolist(), chunk.items.tolist(), chunk.ratings.tolist(),
               chunk.timestamps.tolist(), chunk.review_texts.tolist(),
               chunk.review_summaries.tolist())
  assert got == expected
  # K is complete JSON but lacks its final newline: reported as a possibly cut file.
  assert [e[1] for e in expected] == ["A", "B", "C", "D", "E", "F", "J"]
  assert expected[1][4] == "padded" and expected[2][4] == "" and expected[4][0] == "123"
  assert columnar.tracker.to_json() == per_line.tracker.to_json()
  assert [b.line for b in per_line.tracker.examples] == [9, 10, 11, 12, 13, 15]
  assert "no trailing newline: the file may be truncated" in per_line.tracker.examples[-1].reason
  assert columnar.counts == per_line.counts


def test_columnar_first_bad_line_raises_like_per_line(tmp_path):
  write_lines(tmp_path / "Books_5.json.gz", [review18("U", "A", 1), review18("U", "B", 2,
                                                                         rating=9.0)])
  with pytest.raises(BadInputError, match=r"Books_5.json.gz:2: overall=9.0 is not one of"):
    list(amazon.AmazonReader(tmp_path).event_chunks())


def test_sniffing_skips_a_malformed_first_line(tmp_path):
  path = write_lines(tmp_path / "Books_5.json.gz", ["{oops", review18("U", "A", 1)])
  assert amazon.sniff_format(str(path)) == amazon.FORMAT_JSON
  reader = amazon.AmazonReader(tmp_path, tracker=BadLineTracker(0.5))
  assert [e.item for e in reader.events()] == ["A"] and reader.tracker.examples[0].line == 1
  write_lines(tmp_path / "Toys_5.json.gz", ["not a record", "neither"])
  with pytest.raises(BadInputError, match=r"is a JSON object .* first error at \S*Toys_5.json.gz:1: "):
    amazon.sniff_format(str(tmp_path / "Toys_5.json.gz"))


def test_prepare_cli_reports_duplicates_and_fails_on_a_bad_line(dump, tmp_path):
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "data_pipelines.prepare", "--dataset=amazon",
         f"--manual_dir={dump}", "--reader_option=categories=Gift_Cards,All_Beauty",
         f"--data_dir={tmp_path / 'out'}"]
  ok = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert re.search(r"duplicate events dropped\s+1\n", ok.stdout)
  assert re.search(r"ratings/events read\s+6\n", ok.stdout)
  bad = write_lines(dump / "Gift_Cards" / "Gift_Cards_5.json.gz",
                    REVIEWS_2018 + ['{"reviewerID": "U1", "asin": "A9"'])
  failed = subprocess.run(cmd[:-1] + [f"--data_dir={tmp_path / 'out2'}"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
  assert failed.returncode != 0
  assert f"{bad}:5: not a valid JSON record" in failed.stderr
