"""`--mode=generate` works from a copied User-LLM workdir alone (tiny random LLM)."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import records
from tests import workdir_fixtures
from user_llm_jax import inference
from user_llm_jax import runs
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  _, workdir = workdir_fixtures.user_llm_run(root, steps=2, eval__num_examples=2,
                                             tasks__names=("favorite_category",))
  return root, workdir


def test_generate_from_a_copied_workdir_without_data_or_llm_source(trained, tmp_path):
  root, workdir = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  model, tokenizer, vocab, run = inference.load_trained(str(copy))
  # Nothing else is read: the prepared data and the raw data can be gone.
  shutil.rmtree(root / "data")
  shutil.rmtree(workdir / "raw", ignore_errors=True)
  history = tmp_path / "me.jsonl"
  raw_ids = [it.raw_id for it in vocab.items[2:5]]
  history.write_text("".join(f'{{"movieId": "{r}", "rating": 4.0, "timestamp": {i}}}\n'
                             for i, r in enumerate(raw_ids)))
  record = inference.history_record(str(history), vocab)
  assert record.pop("unknown_items") == []
  transform = ex_lib.TaskExample(vocab, tokenizer, runner.example_config(run.config,
                                                                         vocab=vocab))
  example = transform.crop.map(record)
  prompt = prompts.chat_prompt(tokenizer, "Which genre do I like?")
  answer = inference.answer(model, tokenizer, example, prompt, 4)
  # The same weights as the original run: the same answer.
  original, _, _, _ = inference.load_trained(str(workdir))
  assert inference.answer(original, tokenizer, example, prompt, 4) == answer
  np.testing.assert_array_equal(np.asarray(model.bridge.projection.kernels[0][...]),
                                np.asarray(original.bridge.projection.kernels[0][...]))


def test_generate_errors_are_clear(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(runs.NotARunError, match="holds no trained User-LLM"):
    inference.load_trained(str(tmp_path))
  _, _, vocab, _ = inference.load_trained(str(workdir))
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(records.BadInputError, match="empty.csv: no events"):
    inference.history_record(str(empty), vocab)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"movieId": "1"}\n\n{"movieId": "2", "rating": "x"}\n')
  with pytest.raises(records.BadInputError, match=r"bad.jsonl:3: bad rating"):
    inference.history_record(str(bad), vocab)
  unknown = tmp_path / "unknown.csv"
  unknown.write_text("userId,movieId,rating,timestamp\n1,99999,4.0,1\n1,abc,5.0,2\n")
  with pytest.raises(records.BadInputError, match=r"none of its 2 events.*2:99999, 3:abc"):
    inference.history_record(str(unknown), vocab)


def test_launcher_reports_a_missing_run_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/user_llm_movielens.py:smoke", "--mode=generate",
       f"--workdir={tmp_path}", f"--history_file={tmp_path / 'h.csv'}"],
      capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "holds no trained User-LLM" in proc.stderr.strip().splitlines()[-1]
