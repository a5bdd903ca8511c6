"""Answers for users: history files (ids, titles, bad input), --mode=generate's JSON,
--mode=infer's batches (equal to one-at-a-time answers) and its resume after a kill."""

import json
import shutil
import subprocess
import sys

import pytest

from data_pipelines import records
from tests import workdir_fixtures
from user_llm_jax import answer_log
from user_llm_jax import histories
from user_llm_jax import inference
from user_llm_jax import runs
from user_llm_jax.data import schema
from user_llm_jax.jobs import generate
from user_llm_jax.jobs import infer

HEADER = "userId,movieId,rating,timestamp\n"


def _vocab() -> schema.Vocabulary:
  titles = ["Toy Story (1995)", "Heat (1995)", "Heat! (1995)", "Emma (1996)", "Emma (1996)",
            "Amélie (2001)"]
  items = (schema.ItemInfo("<pad>", "<pad>"), schema.ItemInfo("<oov>", "<oov>")) + tuple(
      schema.ItemInfo(str(10 + i), t, (2,)) for i, t in enumerate(titles))
  return schema.Vocabulary("movielens", items, (0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
                           ("<pad>", "<oov>", "Drama"))


VOCAB = _vocab()
RAW = {it.title: it.raw_id for it in VOCAB.items}


def _item(raw_id: str) -> int:
  return next(i for i, it in enumerate(VOCAB.items) if it.raw_id == raw_id)


# -- history files against a small catalogue (no model) ----------------------------------


def test_titles_match_exactly_first_then_ignoring_case_accents_and_punctuation(tmp_path):
  csv_file = tmp_path / "titles.csv"
  csv_file.write_text('userId,title,rating,timestamp\n'
                      '7,Toy Story (1995),4.0,1\n'       # line 2: exact
                      '7,"toy story, 1995",3.0,2\n'      # line 3: loose
                      '7,AMELIE 2001,5.0,3\n'            # line 4: loose, accent dropped
                      '7,Heat (1995),4.0,4\n'            # line 5: exact beats loose ambiguity
                      '7,heat 1995,4.0,5\n'              # line 6: loose -> 2 items: ambiguous
                      '7,Emma (1996),4.0,6\n'            # line 7: exact -> 2 items: ambiguous
                      '7,Jaws (1975),4.0,7\n')           # line 8: no such title
  jsonl_file = tmp_path / "titles.jsonl"
  jsonl_file.write_text("".join(json.dumps(r) + "\n" for r in [
      {"title": "Toy Story (1995)", "rating": 4.0, "timestamp": 1},
      {"title": "toy story, 1995", "rating": 3.0, "timestamp": 2},
      {"title": "AMELIE 2001", "rating": 5.0, "timestamp": 3},
      {"title": "Heat (1995)", "rating": 4.0, "timestamp": 4},
      {"title": "heat 1995", "timestamp": 5},
      {"title": "Emma (1996)", "timestamp": 6},
      {"title": "Jaws (1975)", "timestamp": 7}]))
  for path, first in ((csv_file, 2), (jsonl_file, 1)):
    history, users = histories.read_history(str(path), VOCAB)
    assert users == 1
    expected = [_item(RAW[t]) for t in ("Toy Story (1995)", "Toy Story (1995)",
                                        "Amélie (2001)", "Heat (1995)")]
    assert history.record[schema.ITEM_IDS].tolist() == expected + [schema.PAD_ID]
    assert history.record[schema.RATINGS].tolist()[:3] == [5, 4, 6]  # rating-token ids
    assert history.unmatched_titles == (f"{first + 6}:'Jaws (1975)'",)
    assert [a.split(" (2 items")[0] for a in history.ambiguous_titles] == [
        f"{first + 4}:'heat 1995'", f"{first + 5}:'Emma (1996)'"]
    assert "2 items: ids 11, 12" in history.ambiguous_titles[0]
    assert "2 items: ids 13, 14" in history.ambiguous_titles[1]
    assert history.rows == 7 and history.num_events == 4
    notes = history.notes()
    assert f"{first + 6}:'Jaws (1975)'" in notes and "2 ambiguous title(s), skipped" in notes


def test_ids_and_titles_mix_and_unknown_ids_are_kept_as_unknown_items(tmp_path):
  path = tmp_path / "mixed.csv"
  path.write_text("userId,movieId,title,rating,timestamp\n"
                  "1,10,,4.0,30\n1,,Heat (1995),3.0,10\n1,999,,5.0,20\n")
  record = inference.history_record(str(path), VOCAB)
  # Sorted by time; the unknown id stays as an OOV event.
  assert record[schema.ITEM_IDS].tolist() == [_item("11"), schema.OOV_ID, _item("10"), 0]
  assert record["unknown_items"] == ["4:999"]


@pytest.mark.parametrize("name,text,error", [
    ("fields.csv", HEADER + "1,10,4.0,5\n1,11,4.0\n", r"fields.csv:3: expected 4 fields"),
    ("rating.csv", HEADER + "1,10,x,5\n", r"rating.csv:2: bad rating"),
    ("time.csv", HEADER + "1,10,4.0,-3\n", r"time.csv:2: .*timestamp must be >= 0"),
    ("noitem.csv", "userId,movieId,title\n1,10,\n1,,\n", r"noitem.csv:3: no 'movieId'"),
    ("json.jsonl", '{"movieId": "10"}\n\n{oops\n', r"json.jsonl:3: not a JSON object"),
    ("array.jsonl", '[1, 2]\n', r"array.jsonl:1: expected a JSON object, got list"),
    ("nan.jsonl", '{"movieId": "10", "rating": NaN}\n', r"nan.jsonl:1: .*not a finite"),
    ("noitem.jsonl", '{"movieId": "10"}\n{"rating": 4}\n', r"noitem.jsonl:2: no 'movieId'"),
    ("column.csv", "userId,rating,timestamp\n1,4.0,5\n",
     r"column.csv:1: header \['userId', 'rating', 'timestamp'\] has no 'movieId'"),
    ("empty.csv", "", r"empty.csv: no events \(an empty history file\)"),
    ("header.csv", HEADER, r"header.csv: no events"),
    ("blank.jsonl", "\n\n", r"blank.jsonl: no events"),
])
def test_bad_history_files_are_named_with_file_and_line(tmp_path, name, text, error):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(records.BadInputError, match=error):
    histories.read_history(str(path), VOCAB)


def test_a_history_without_a_known_item_is_refused_with_every_reason(tmp_path):
  path = tmp_path / "none.csv"
  path.write_text("userId,movieId,title,rating,timestamp\n"
                  "1,999,,4.0,1\n1,,Jaws (1975),4.0,2\n1,,Emma (1996),4.0,3\n")
  with pytest.raises(records.BadInputError,
                     match=r"none of its 3 events names a catalogue item \(unknown ids at "
                           r"line:id 2:999; unmatched titles at line:title 3:'Jaws \(1975\)'; "
                           r"ambiguous titles at line:title 4:'Emma \(1996\)'"):
    histories.read_history(str(path), VOCAB)


def test_a_file_of_many_users_reports_refused_users_and_needs_user_ids(tmp_path):
  path = tmp_path / "users.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in [
      {"userId": "a", "movieId": "999"}, {"userId": "b", "movieId": "10"},
      {"userId": "a", "title": "Jaws"}, {"userId": "c", "title": "heat 1995"},
      {"userId": "c", "title": "amelie (2001)"}]))
  found = histories.read_histories(str(path), VOCAB, need_user_ids=True)
  assert found.users == ["a", "b", "c"]
  assert [h.user_id for h in found.histories] == ["b", "c"]
  assert "1:999" in found.refused["a"] and "3:'Jaws'" in found.refused["a"]
  assert found.totals() == {"users": 2, "refused_users": 1, "rows": 5, "unknown_ids": 0,
                            "unmatched_titles": 0, "ambiguous_titles": 1}
  assert "refused user 'a'" in found.report() and "4:'heat 1995'" in found.report()
  # One user at a time: the first user is the one answered, and it has no known item.
  with pytest.raises(records.BadInputError, match=r"users.jsonl: none of its 2 events"):
    histories.read_history(str(path), VOCAB)
  path.write_text('{"userId": "a", "movieId": "10"}\n{"movieId": "11"}\n')
  with pytest.raises(records.BadInputError, match=r"users.jsonl:2: no 'userId'"):
    histories.read_histories(str(path), VOCAB, need_user_ids=True)


def test_answer_log_keeps_complete_lines_and_drops_a_cut_one(tmp_path):
  path = str(tmp_path / "out" / "a.jsonl")
  log = answer_log.AnswerLog(path, {"top_k": 3}, key="user_id")
  assert log.resume() == {}
  log.append([{"user_id": "a", "x": 1}, {"user_id": "b", "x": 2}])
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"user_id": "c", "x"')  # killed mid-write
  again = answer_log.AnswerLog(path, {"top_k": 3}, key="user_id")
  assert list(again.resume()) == ["a", "b"] and again.dropped_partial_line
  again.append([{"user_id": "c", "x": 3}])
  assert [json.loads(l)["user_id"] for l in open(path, encoding="utf-8")] == ["a", "b", "c"]
  with pytest.raises(records.BadInputError, match=r"other settings \(top_k: 3 -> 5\)"):
    answer_log.AnswerLog(path, {"top_k": 5}, key="user_id").resume()
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"user_id": "a", "x": 4}\nnot json\n')
  with pytest.raises(records.BadInputError, match=r"a.jsonl:4: user_id 'a' is answered twice"):
    answer_log.AnswerLog(path, {"top_k": 3}, key="user_id").resume()
  stray = tmp_path / "stray.jsonl"
  stray.write_text('{"user_id": "a"}\n')
  with pytest.raises(records.BadInputError, match="not an answers file"):
    answer_log.AnswerLog(str(stray), {}, key="user_id").resume()


# -- a tiny trained User-LLM -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-step User-LLM with an item head (beam search for titles: exact_threshold 0)."""
  root = tmp_path_factory.mktemp("infer")
  config, workdir = workdir_fixtures.user_llm_run(root, eval__exact_threshold=0,
                                                  bridge__item_head=True)
  model, tokenizer, vocab, run = inference.load_trained(str(workdir))
  return {"root": root, "workdir": workdir, "config": config, "model": model,
          "tokenizer": tokenizer, "vocab": vocab, "run": run}


_flags = workdir_fixtures.flag_values
_users_csv = workdir_fixtures.users_csv
_lines = workdir_fixtures.read_lines


def test_infer_batches_equal_single_answers_and_resume_after_a_kill(trained, tmp_path, capsys):
  model, tokenizer, vocab, run = (trained[k] for k in ("model", "tokenizer", "vocab", "run"))
  users = _users_csv(vocab, tmp_path / "users.csv")
  full = tmp_path / "full.jsonl"
  with _flags(history_file=str(users), output=str(full), top_k=4, split=None, max_users=0):
    summary = infer.run(trained["config"], str(trained["workdir"]))
  assert summary["answered_now"] == 5 and summary["batch_size"] == 3
  assert summary["users_per_sec"] > 0
  assert "users/s" in capsys.readouterr().out
  lines = _lines(full)
  assert [l["user_id"] for l in lines] == [f"u{i}" for i in range(5)]

  # One user at a time (batch of 1, no padding): the same items, scores and greedy text.
  single = inference.Answerer(model, tokenizer, vocab, run.config, top_k=4)
  tasks = single.answered_tasks(with_targets=False)
  assert tasks == ("next_item", "favorite_category")
  found = histories.read_histories(str(users), vocab, need_user_ids=True)
  for history, line in zip(found.histories, lines):
    alone = single.top_items([history.record])[0]
    assert [(e["item_id"], e["title"]) for e in alone] == [
        (e["item_id"], e["title"]) for e in line["top_items"]]
    # Scores agree to float32 rounding (a batch of 1 runs other kernels than one of 3).
    assert [e["score"] for e in alone] == pytest.approx(
        [e["score"] for e in line["top_items"]], abs=1e-5)
    assert single.task_answers([history.record], tasks)[0] == line["answers"]
    assert len(line["top_items"]) == 4
    scores = [e["score"] for e in line["top_items"]]
    assert scores == sorted(scores, reverse=True)

  # A kill mid-write: two complete lines, half of the third.
  cut = tmp_path / "cut.jsonl"
  text = full.read_text(encoding="utf-8").splitlines(keepends=True)
  cut.write_text("".join(text[:2]) + text[2][:len(text[2]) // 2], encoding="utf-8")
  shutil.copy(answer_log.summary_path(str(full)), answer_log.summary_path(str(cut)))
  with _flags(history_file=str(users), output=str(cut), top_k=4, split=None, max_users=0):
    again = infer.run(trained["config"], str(trained["workdir"]))
  assert "dropped a partially written last line" in capsys.readouterr().out
  assert (again["kept_from_earlier"], again["answered_now"]) == (2, 3)
  assert cut.read_bytes() == full.read_bytes()
  # Everything answered: a rerun answers nobody; other settings are refused.
  with _flags(history_file=str(users), output=str(cut), top_k=4, split=None, max_users=0):
    assert infer.run(trained["config"], str(trained["workdir"]))["answered_now"] == 0
  with _flags(history_file=str(users), output=str(cut), top_k=3, split=None, max_users=0):
    with pytest.raises(records.BadInputError, match=r"top_k: 4 -> 3"):
      infer.run(trained["config"], str(trained["workdir"]))

  # --mode=generate for u0 alone gives infer's ranking, and writes it as JSON.
  me = tmp_path / "me.csv"
  header, *rows = users.read_text().splitlines(keepends=True)
  me.write_text(header + "".join(r for r in rows if r.startswith("u0,")))
  answer = tmp_path / "me.json"
  with _flags(history_file=str(me), output=str(answer), top_k=4):
    out = generate.run(trained["config"], str(trained["workdir"]))
  written = json.loads(answer.read_text(encoding="utf-8"))
  assert written["top_items"] == out["top_items"]
  assert [e["item_id"] for e in written["top_items"]] == [
      e["item_id"] for e in lines[0]["top_items"]]
  assert isinstance(written["answer"], str) and written["user_id"] == "u0"
  assert written["events"] == 4 and written["unknown_ids"] == []
  assert "item head" in written["ranking"]


def test_infer_a_prepared_split_in_steps(trained, tmp_path):
  output = tmp_path / "test.jsonl"
  with _flags(history_file=None, split="test", output=str(output), top_k=2, max_users=2):
    infer.run(trained["config"], str(trained["workdir"]))
  with _flags(history_file=None, split="test", output=str(output), top_k=2, max_users=4):
    summary = infer.run(trained["config"], str(trained["workdir"]))
  assert (summary["kept_from_earlier"], summary["answered_now"]) == (2, 2)
  lines = _lines(output)
  assert [l["record"] for l in lines] == [0, 1, 2, 3]
  vocab = trained["vocab"]
  titles = {it.raw_id: it.title for it in vocab.items}
  for line in lines:
    assert titles[line["target"]["item_id"]] == line["target"]["title"]
    assert line["references"]["next_item"] == line["target"]["title"]
    assert set(line["answers"]) == {"next_item", "favorite_category"}
    assert len(line["top_items"]) == 2


def test_beam_search_ranking_is_the_same_in_a_batch(trained):
  model, tokenizer, vocab, run = (trained[k] for k in ("model", "tokenizer", "vocab", "run"))
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  data = prepared.load_splits(run.config.data, run.workdir)
  recs = [dict(data.test[i]) for i in range(3)]
  batched = inference.Answerer(model, tokenizer, vocab, run.config, top_k=3,
                               ranking="titles", pad_to=3)
  single = inference.Answerer(model, tokenizer, vocab, run.config, top_k=3, ranking="titles")
  assert batched.method == "beam" and "beam search" in batched.procedure
  together = batched.top_items(recs[:2])
  alone = [single.top_items([r])[0] for r in recs[:2]]
  assert [[e["item_id"] for e in row] for row in together] == [
      [e["item_id"] for e in row] for row in alone]
  assert [e["score"] for row in together for e in row] == pytest.approx(
      [e["score"] for row in alone for e in row], abs=1e-4)
  catalogue = {it.raw_id for it in vocab.items[schema.FIRST_ID:]}
  assert all(e["item_id"] in catalogue and e["score"] < 0 for row in together for e in row)


def test_missing_runs_and_inputs_are_one_clear_line(trained, tmp_path):
  with _flags(history_file=str(tmp_path / "x.csv"), split=None, output=None):
    with pytest.raises(runs.NotARunError, match="holds no trained User-LLM"):
      infer.run(trained["config"], str(tmp_path))
  with _flags(history_file=None, split=None):
    with pytest.raises(records.BadInputError, match="exactly one of --history_file"):
      infer.run(trained["config"], str(trained["workdir"]))
  bad = tmp_path / "bad.csv"
  bad.write_text("userId,rating,timestamp\n1,4.0,5\n")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/user_llm_movielens.py:smoke", "--mode=infer",
       f"--workdir={trained['workdir']}", f"--history_file={bad}"],
      capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: header")
