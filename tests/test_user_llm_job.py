"""User-LLM jobs end to end on the smoke configs (tiny random LLM, tiny encoder).

Every test here compiles a train step and evaluation functions, so the file is marked slow;
the smoke data is generated once per module.
"""

import json
import os
import shutil

import numpy as np
import pytest
from absl import flags

from experiments.configs import main as main_config
from experiments.configs import user_llm_movielens
from data_pipelines import records
from data_pipelines import timelines
from user_llm_jax import inference
from user_llm_jax import runs
from user_llm_jax.data import schema
from user_llm_jax.jobs import generate
from user_llm_jax.jobs import main_pipeline
from user_llm_jax.jobs import train_user_llm
from user_llm_jax.tasks import runner
from user_llm_jax.train import checkpointing

pytestmark = pytest.mark.slow


def smoke_config(**changes):
  config = user_llm_movielens.get_config("smoke")
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """Synthetic raw data + its preparation, shared by the runs of this module."""
  root = tmp_path_factory.mktemp("smoke_data")
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  prepared.prepare(smoke_config().data, str(root))
  return {"data.manual_dir": str(root / "raw"), "data.data_dir": str(root / "data")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dirs):
  workdir = tmp_path_factory.mktemp("user_llm_run")
  summary = train_user_llm.run(smoke_config(**data_dirs), str(workdir))
  return workdir, summary


def test_job_writes_summary_with_metrics(finished_run, data_dirs):
  workdir, summary = finished_run
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk["steps"] == 6
  metrics = on_disk["metrics"]
  for k in ("recall@1", "recall@5", "recall@10"):
    assert 0.0 <= metrics["user_llm"]["next_item"][k] <= 1.0
    assert 0.0 <= metrics["popularity"]["next_item"][k] <= 1.0
  r = metrics["user_llm"]["next_item"]
  assert r["recall@1"] <= r["recall@5"] <= r["recall@10"]
  assert metrics["user_llm"]["next_item"]["num_examples"] == 6
  assert "exact scoring" in metrics["user_llm"]["next_item"]["procedure"]
  assert 0.0 <= metrics["user_llm"]["favorite_category"]["accuracy"] <= 1.0
  # The majority-label floor, recomputed from the prepared records the job read.
  data = runner.load(smoke_config(**data_dirs), str(workdir))
  labels = [int(r["favorite_category"]) for r in data.train]
  best = max(set(labels), key=lambda c: (labels.count(c), -c))
  idx = runner.eval_indices(len(data.test), 6, 0)
  expected = np.mean([int(data.test[i]["favorite_category"]) == best for i in idx])
  majority = metrics["majority"]["favorite_category"]
  assert majority["answer"] == data.vocab.categories[best]
  assert majority["accuracy"] == pytest.approx(expected)
  assert "majority" in (workdir / "summary.txt").read_text()
  # The exact count of the encoder's window, recomputed by the label's rule.
  config = smoke_config(**data_dirs)
  right = []
  for i in idx:
    r = data.test[i]
    cats = schema.split_categories(r["category_ids"], r["category_lengths"])[:-1]
    view = [c[:config.data.max_categories] for c in cats[-config.data.window:]]
    flat = np.asarray([c for cs in view for c in cs], np.int64)
    right.append(timelines.favorite_category(flat, np.asarray([len(c) for c in view] + [0]))
                 == int(r["favorite_category"]))
  count = metrics["count_window"]["favorite_category"]
  assert count["accuracy"] == pytest.approx(np.mean(right))
  assert count["per_example"]["ids"] == idx
  # The linear probe reads a pretrained encoder's states: none with a random encoder (the
  # main pipeline's test below has one).
  assert "probe" not in metrics
  # Enc strategy: encoder + bridge train, the LLM does not.
  groups = on_disk["param_groups"]
  assert on_disk["trainable_params"] == groups["encoder"] + groups["bridge"]
  assert on_disk["total_params"] == sum(groups.values()) > on_disk["trainable_params"]
  assert "R@10" in (workdir / "summary.txt").read_text()
  # Paired verdicts against the run's own floors and shuffled control, in JSON and text.
  verdicts = on_disk["verdicts"]
  assert any(v.startswith("favorite_category accuracy: user_llm ") and " majority " in v
             for v in verdicts)
  assert any(" user_llm_shuffled " in v and "paired, n = 6" in v for v in verdicts)
  assert verdicts[0] in (workdir / "summary.txt").read_text()
  assert summary["history"][-1]["step"] == 6
  # Diagnostics kept in every run: per-task losses, gate values, the shuffled control.
  last = summary["history"][-1]
  assert any(k.startswith("gate/xattn") for k in last)
  assert "loss/next_item" in last and "loss/favorite_category" in last
  shuffled = metrics["user_llm_shuffled"]
  assert set(shuffled) == {"next_item", "favorite_category"}
  assert shuffled["favorite_category"]["num_examples"] == 6
  assert "accuracy_stderr" in metrics["user_llm"]["favorite_category"]
  # The run describes itself: config, architecture, vocabulary and tokenizer.
  run = runs.load_run(str(workdir), job="train_user_llm")
  assert run.architecture["strategy"] == "enc"
  assert run.config.train.num_steps == 6
  assert run.vocabulary().num_items == data.vocab.num_items
  assert run.tokenizer().vocab_size > 0


def test_resume_of_a_user_llm_run_is_exact(finished_run, tmp_path, data_dirs):
  workdir, summary = finished_run
  run2 = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints", run2 / "checkpoints")
  # Drop the final checkpoint: the rerun restores step 3 and trains steps 4-6 again.
  shutil.rmtree(run2 / "checkpoints" / "6")
  # A change of a key that cannot change the result resumes (log_every too, in
  # tests/test_fingerprint.py; here it would regroup the logged averages).
  resumed = train_user_llm.run(smoke_config(**data_dirs, **{"train.keep_checkpoints": 2}),
                               str(run2))
  assert resumed["resumed_from"] == 3
  assert resumed["trainable_checksum"] == summary["trainable_checksum"]
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in summary["history"]]
  for key in ("user_llm", "user_llm_shuffled"):
    for task, m in resumed["metrics"][key].items():
      timing = ("eval_sec", "sec_per_answer")
      assert ({k: v for k, v in m.items() if k not in timing}
              == {k: v for k, v in summary["metrics"][key][task].items() if k not in timing})


def test_resume_refuses_a_changed_learning_rate(finished_run, tmp_path, data_dirs):
  workdir, _ = finished_run
  run2 = tmp_path / "changed"
  shutil.copytree(workdir / "checkpoints", run2 / "checkpoints")
  with pytest.raises(checkpointing.CheckpointError, match=r"train\.learning_rate"):
    train_user_llm.run(smoke_config(**data_dirs, **{"train.learning_rate": 0.5}), str(run2))


@pytest.mark.parametrize("frozen", [False, True])
def test_item_head_ranks_the_catalogue_and_trains(tmp_path, data_dirs, frozen):
  config = smoke_config(**data_dirs, **{"bridge.item_head": True,
                                        "bridge.item_head_skip": True,
                                        "bridge.item_head_skip_frozen": frozen,
                                        "tasks.next_item_titles": False})
  summary = train_user_llm.run(config, str(tmp_path))
  head = summary["metrics"]["user_llm_item_head"]["next_item"]
  sasrec_protocol = summary["metrics"]["popularity"]["next_item"]
  assert head["num_examples"] == sasrec_protocol["num_examples"] == 6
  assert "item head" in head["procedure"] and "full-catalogue" in head["procedure"]
  assert 0.0 <= head["recall@1"] <= head["recall@10"] <= 1.0
  assert "ndcg@10" in head
  # No titles were trained, so none are decoded.
  assert "next_item" not in summary["metrics"]["user_llm"]
  assert all(h["item_examples"] > 0 for h in summary["history"])
  assert "user_llm_item_head_shuffled" in summary["metrics"]
  # The skip alone (the trained encoder's own head), on the same users, paired with the head.
  skip = summary["metrics"]["user_llm_encoder_head"]["next_item"]
  assert skip["num_examples"] == 6
  groups = summary["param_groups"]
  assert summary["trainable_params"] == groups["encoder"] + groups["bridge"]
  if frozen:
    # The frozen copy is saved with the model and trained by no strategy.
    assert groups["skip_encoder"] == groups["encoder"]
    assert "reads the frozen pretrained copy" in skip["procedure"]
  else:
    assert "skip_encoder" not in groups
    assert "skip without the LLM's part" in skip["procedure"]
  assert set(skip["per_example"]) == set(head["per_example"])
  assert any(v.startswith("next_item recall@10: user_llm_item_head ")
             and " user_llm_encoder_head " in v for v in summary["verdicts"])


def test_soft_prompt_perceiver_lora_with_random_encoder(tmp_path, data_dirs):
  config = smoke_config(**data_dirs, **{
      "bridge.mode": "soft_prompt", "bridge.use_perceiver": True, "strategy": "lora",
      "train.num_steps": 2, "eval.num_examples": 2, "tasks.names": ("favorite_category",)})
  summary = train_user_llm.run(config, str(tmp_path))
  groups = summary["param_groups"]
  assert groups["llm_lora"] > 0
  assert summary["trainable_params"] == groups["encoder"] + groups["bridge"] + groups["llm_lora"]
  assert summary["metrics"]["user_llm"]["favorite_category"]["num_examples"] == 2


def test_main_pipeline_smoke_and_generate(tmp_path):
  workdir = tmp_path / "main"
  config = main_config.get_config("smoke")
  summary = main_pipeline.run(config, str(workdir))
  methods = list(summary["metrics"])
  assert methods[0].startswith("User-LLM")
  assert any("shuffled" in m for m in methods)
  assert {"SASRec-style encoder", "popularity", "majority genre",
          "exact count of the encoder's events (reference)",
          "exact count of the text prompt's events (reference)",
          "linear probe of the encoder's states (reference)"} <= set(methods)
  probe_row = summary["metrics"]["linear probe of the encoder's states (reference)"]
  assert probe_row["favorite_category"]["num_examples"] == 3
  assert any(" probe " in v for v in summary["verdicts"])
  text_row = next(m for m in methods if m.startswith("text prompt"))
  head_row = next(m for m in methods if "item head" in m)
  assert 0.0 <= summary["metrics"][head_row]["next_item"]["recall@10"] <= 1.0
  for name in (methods[0], text_row):
    assert 0.0 <= summary["metrics"][name]["favorite_category"]["accuracy"] <= 1.0
    for task in summary["metrics"][name].values():
      assert task["num_examples"] == 3
  assert summary["flops_per_answer"]["text_prompt"] > 0
  assert summary["verdicts"]
  gen = summary["generation"]
  assert gen["recent"] and set(gen["answers"]) == {"next_item", "favorite_category"}
  for stage in ("encoder", "user_llm", "text_baseline"):
    assert (workdir / stage / "summary.json").exists()
  text = (workdir / "summary.txt").read_text()
  assert "personalized generation" in text and "SASRec-style" in text

  # Rerunning reuses every finished stage.
  mtime = os.path.getmtime(workdir / "user_llm" / "summary.json")
  again = main_pipeline.run(config, str(workdir))
  assert os.path.getmtime(workdir / "user_llm" / "summary.json") == mtime
  assert again["metrics"] == summary["metrics"]

  # A changed config is refused rather than a finished stage silently reused.
  changed = main_config.get_config("smoke")
  changed.train.learning_rate = 0.5
  with pytest.raises(main_pipeline.StageConfigChanged, match="train.learning_rate"):
    main_pipeline.run(changed, str(workdir))

  # --mode=generate from a copy of the User-LLM stage alone: no encoder run, no data.
  alone = tmp_path / "alone"
  shutil.copytree(workdir / "user_llm", alone)
  shutil.rmtree(workdir / "encoder")
  history = tmp_path / "me.csv"
  history.write_text("userId,movieId,rating,timestamp\n7,1,4.0,100\n7,2,3.5,200\n"
                     "7,999999,5.0,300\n")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  flags.FLAGS.history_file = str(history)
  try:
    out = generate.run(config, str(alone))
  finally:
    flags.FLAGS.history_file = None
  assert isinstance(out["answer"], str) and len(out["recent"]) == 3
  assert out["unknown_items"] == 1
  with pytest.raises(runs.NotARunError, match="no trained User-LLM.*experiments.main"):
    inference.load_trained(str(tmp_path / "empty"))


def test_history_file_errors_name_file_and_line(tmp_path, data_dirs):
  from user_llm_jax.data import source  # pylint: disable=g-import-not-at-top
  _, vocab, _ = source.load_prepared(data_dirs["data.data_dir"], "train")
  bad = tmp_path / "bad.csv"
  bad.write_text("userId,movieId,rating,timestamp\n1,1,x,5\n")
  with pytest.raises(records.BadInputError, match=r"bad.csv:2"):
    inference.history_record(str(bad), vocab)
  # Empty files, unknown ids and JSON-lines line numbers: tests/test_generate_from_workdir.py.
  good = tmp_path / "good.jsonl"
  good.write_text('{"movieId": "2", "rating": 4.0, "timestamp": 2}\n'
                  '{"movieId": "1", "rating": 3.0, "timestamp": 1}\n')
  record = inference.history_record(str(good), vocab)
  # Sorted by time, plus the placeholder target after the last event.
  assert record["item_ids"].tolist()[-1] == 0 and len(record["item_ids"]) == 3
  assert np.all(np.diff(record["timestamps"]) >= 0)
