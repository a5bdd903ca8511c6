"""--mode=infer over a text-prompt baseline run: the same users as the User-LLM, answered
with the history as text (batches equal to one-at-a-time answers, resume after a kill),
its trained adapters, and a clear error for a workdir that is neither kind of run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from data_pipelines import records
from tests import workdir_fixtures
from user_llm_jax import answer_log
from user_llm_jax import histories
from user_llm_jax import inference
from user_llm_jax import runs
from user_llm_jax import text_prompt
from user_llm_jax.jobs import infer
from user_llm_jax.llm import lora as lora_lib
from user_llm_jax.tasks import prompts


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """A User-LLM and a zero-shot text-prompt baseline trained on the same prepared data."""
  root = tmp_path_factory.mktemp("text_infer")
  _, user_llm = workdir_fixtures.user_llm_run(root, bridge__item_head=True)
  _, text = workdir_fixtures.text_baseline_run(root)
  return {"root": root, "user_llm": user_llm, "text": text}


def test_text_infer_equals_single_answers_and_resumes_after_a_kill(workdirs, tmp_path,
                                                                   capsys):
  run = text_prompt.trained_run(str(workdirs["text"]))
  assert run.job == "text_baseline" and run.architecture["strategy"] == "zero_shot"
  vocab = run.vocabulary()
  users = workdir_fixtures.users_csv(vocab, tmp_path / "users.csv")
  full = tmp_path / "text.jsonl"
  summary = infer.infer(str(workdirs["text"]), history_file=str(users), top_k=3,
                        output=str(full))
  assert summary["reader"] == "text_prompt" and summary["answered_now"] == 5
  assert summary["batch_size"] == 3 and summary["users_per_sec"] > 0
  assert summary["users_per_sec_after_first_batch"] > 0
  # Its evaluation's procedures: exact scoring of the 60 titles, greedy favorite genre.
  assert summary["ranking"].startswith("exact log-probability")
  assert summary["tasks"] == ["favorite_category"]
  assert set(summary["seconds_by_part"]) == {"top_items", "answer:favorite_category"}
  assert "users/s" in capsys.readouterr().out
  lines = workdir_fixtures.read_lines(full)
  assert [l["user_id"] for l in lines] == [f"u{i}" for i in range(5)]

  # The same users through the User-LLM: its prompts carry no history, the text's do.
  ullm = infer.infer(str(workdirs["user_llm"]), history_file=str(users), top_k=3,
                     output=str(tmp_path / "ullm.jsonl"))
  assert ullm["reader"] == "user_llm" and ullm["answered_now"] == 5
  text_len = summary["mean_prompt_tokens"]["favorite_category"]
  assert text_len > ullm["mean_prompt_tokens"]["favorite_category"]

  # One user at a time (batch of 1, no padding): the same titles, scores and answers.
  decoder, tokenizer = text_prompt.load_model(run), run.tokenizer()
  single = text_prompt.answerer(run, decoder, tokenizer, vocab, top_k=3)
  found = histories.read_histories(str(users), vocab, need_user_ids=True)
  for history, line in zip(found.histories, lines):
    alone = single.top_items([history.record])[0]
    assert [e["item_id"] for e in alone] == [e["item_id"] for e in line["top_items"]]
    assert [e["score"] for e in alone] == pytest.approx(
        [e["score"] for e in line["top_items"]], abs=1e-4)
    assert single.task_answers([history.record], ["favorite_category"])[0] == line["answers"]
    # The prompt holds the user's most recent events that fit the budget, as text.
    example = single.example(history.record, prompts.FAVORITE_CATEGORY)
    prompt = tokenizer.decode(example["tokens"][:int(example["prompt_length"])])
    assert f"History: {single.transform.history_text(history.record)}\n" in prompt
  assert any(single.transform.history_text(h.record) for h in found.histories)
  with pytest.raises(ValueError, match="free question is answered by a User-LLM"):
    single.ask([found.histories[0].record], [1, 2], 2)

  # A kill mid-write: two complete lines and half of the third.
  cut = tmp_path / "cut.jsonl"
  text = full.read_text(encoding="utf-8").splitlines(keepends=True)
  cut.write_text("".join(text[:2]) + text[2][:len(text[2]) // 2], encoding="utf-8")
  shutil.copy(answer_log.summary_path(str(full)), answer_log.summary_path(str(cut)))
  again = infer.infer(str(workdirs["text"]), history_file=str(users), top_k=3,
                      output=str(cut))
  assert "dropped a partially written last line" in capsys.readouterr().out
  assert (again["kept_from_earlier"], again["answered_now"]) == (2, 3)
  assert cut.read_bytes() == full.read_bytes()
  done = infer.infer(str(workdirs["text"]), history_file=str(users), top_k=3,
                     output=str(cut))
  assert done["answered_now"] == 0 and done["users_per_sec"] is None
  # The User-LLM's answers file is not the text baseline's.
  with pytest.raises(records.BadInputError, match=r"other settings \(checkpoint_step: 1 -> "
                                                   r"None; run: '.*/run' -> '.*/text'\)"):
    infer.infer(str(workdirs["text"]), history_file=str(users), top_k=3,
                output=str(tmp_path / "ullm.jsonl"))


def test_text_infer_a_split_through_the_launcher_flags(workdirs, tmp_path):
  output = tmp_path / "test.jsonl"
  with workdir_fixtures.flag_values(history_file=None, split="test", output=str(output),
                                    top_k=2, max_users=2):
    summary = infer.run(None, str(workdirs["text"]))
  assert summary["reader"] == "text_prompt" and summary["answered_now"] == 2
  lines = workdir_fixtures.read_lines(output)
  assert [l["record"] for l in lines] == [0, 1]
  vocab = text_prompt.trained_run(str(workdirs["text"])).vocabulary()
  titles = {it.raw_id: it.title for it in vocab.items}
  for line in lines:
    assert titles[line["target"]["item_id"]] == line["target"]["title"]
    assert set(line["references"]) == set(line["answers"]) == {"favorite_category"}
    assert len(line["top_items"]) == 2


def test_a_favorite_genre_only_baseline_ranks_no_items(workdirs, tmp_path):
  _, workdir = workdir_fixtures.text_baseline_run(
      workdirs["root"], name="text_genre", baseline__tasks=("favorite_category",))
  vocab = text_prompt.trained_run(str(workdir)).vocabulary()
  users = workdir_fixtures.users_csv(vocab, tmp_path / "users.csv", users=2)
  summary = infer.infer(str(workdir), history_file=str(users), top_k=3,
                        output=str(tmp_path / "genre.jsonl"))
  assert summary["ranking"] is None and set(summary["seconds_by_part"]) == {
      "answer:favorite_category"}
  for line in workdir_fixtures.read_lines(tmp_path / "genre.jsonl"):
    assert "top_items" not in line and set(line["answers"]) == {"favorite_category"}


def test_a_lora_baseline_answers_with_its_trained_adapters(workdirs, tmp_path):
  _, workdir = workdir_fixtures.text_baseline_run(workdirs["root"], strategy="lora",
                                                  name="text_lora")
  decoder = text_prompt.load_model(text_prompt.trained_run(str(workdir)))
  adapters = nnx.state(decoder, lora_lib.LoraParam)
  # Adapters start with B = 0; a trained step moved them, and they were restored.
  b = [np.asarray(v) for p, v in nnx.to_flat_state(adapters) if p[-1] == "lora_b"]
  assert b and any(np.abs(x).max() > 0 for x in b)
  untrained = tmp_path / "untrained"
  shutil.copytree(workdir, untrained, ignore=shutil.ignore_patterns("checkpoints"))
  with pytest.raises(runs.NotARunError, match=r"no trained text-prompt baseline yet "
                                              r"\(strategy 'lora', no checkpoint"):
    text_prompt.trained_run(str(untrained))


def test_a_zero_shot_run_whose_llm_changed_is_refused(workdirs, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(workdirs["text"], copy)
  record = json.loads((copy / runs.RUN_JSON).read_text())
  record["architecture"]["llm"]["num_layers"] += 1
  (copy / runs.RUN_JSON).write_text(json.dumps(record))
  with pytest.raises(runs.NotARunError, match=r"run.json: its config key 'llm.source'="
                                              r"'random' now loads another LLM .*num_layers"):
    text_prompt.load_model(text_prompt.trained_run(str(copy)))


def test_a_zero_shot_run_recorded_before_later_llm_fields_still_loads(workdirs, tmp_path):
  # A run written before LlmConfig gained fields (e.g. the Qwen / Gemma switches) records
  # none of them; their defaults are the architecture it had.
  copy = tmp_path / "old"
  shutil.copytree(workdirs["text"], copy)
  record = json.loads((copy / runs.RUN_JSON).read_text())
  for key in ("qk_norm", "post_norms", "sliding_layers", "scale_embeddings"):
    assert key in record["architecture"]["llm"]
    del record["architecture"]["llm"][key]
  (copy / runs.RUN_JSON).write_text(json.dumps(record))
  model = text_prompt.load_model(text_prompt.trained_run(str(copy)))
  assert model.cfg.num_layers == record["architecture"]["llm"]["num_layers"]


def test_a_workdir_neither_user_llm_nor_text_baseline_is_one_clear_line(workdirs, tmp_path):
  users = tmp_path / "u.csv"
  users.write_text("userId,movieId\nu0,1\n")
  with pytest.raises(runs.NotARunError,
                     match=r"holds no trained User-LLM or text-prompt baseline run \(no "
                           r"run.json\); make a User-LLM with: .*text-prompt baseline with"):
    infer.infer(str(tmp_path / "empty"), history_file=str(users))
  encoder = tmp_path / "encoder"
  config = workdir_fixtures.smoke_config(workdirs["root"], {})
  runs.save_run(str(encoder), "pretrain_encoder", config, {})
  with pytest.raises(runs.NotARunError, match=r"holds no trained User-LLM or text-prompt "
                                              r"baseline run \(it holds a 'pretrain_encoder' "
                                              r"run\)"):
    infer.infer(str(encoder), history_file=str(users))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/user_llm_movielens.py:smoke", "--mode=infer",
       f"--workdir={encoder}", f"--history_file={users}"],
      capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "'pretrain_encoder' run" in last
  # A User-LLM run is refused where a text baseline is read, and the other way round.
  with pytest.raises(runs.NotARunError, match="'train_user_llm' run, not a text-prompt"):
    text_prompt.trained_run(str(workdirs["user_llm"]))
  with pytest.raises(runs.NotARunError, match="'text_baseline' run, not a trained User-LLM"):
    inference.trained_run(str(workdirs["text"]))
