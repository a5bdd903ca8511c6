"""The alignment stage: its examples name the recent titles (or their categories' words), it
trains only the modules it names, and a run killed during or after it resumes to the same
result.

The job-level tests compile an alignment step and a task step of the tiny smoke model, so
they are marked slow; the smoke data is prepared once per module.
"""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import user_llm_movielens
from user_llm_jax import config as config_lib
from user_llm_jax import params as params_lib
from user_llm_jax import sharding
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.jobs import train_user_llm
from user_llm_jax.tasks import alignment
from user_llm_jax.tasks import examples as ex
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import setup

TITLES = ["Alien (1979)", "Aliens (1986)", "Heat (1995)", "Up (2009)", "Jaws (1975)",
          "Big (1988)", "Ran (1985)"]


@pytest.fixture(scope="module")
def vocab():
  items = [schema.ItemInfo("<pad>", "<pad:item>"), schema.ItemInfo("<oov>", "<oov:item>")]
  items += [schema.ItemInfo(str(100 + i), t, (2,)) for i, t in enumerate(TITLES)]
  return schema.Vocabulary(dataset="movielens", items=tuple(items),
                           ratings=(0.0, 0.0, 1.0, 2.0), categories=("<pad>", "<oov>", "Drama"))


def record(items):
  n = len(items)
  return {schema.USER_ID: b"u", schema.ITEM_IDS: np.asarray(items, np.int32),
          schema.RATINGS: np.full((n,), 2, np.int32),
          schema.TIMESTAMPS: np.arange(n, dtype=np.int64) * 60,
          schema.CATEGORY_IDS: np.full((n,), 2, np.int32),
          schema.CATEGORY_LENGTHS: np.ones((n,), np.int32),
          schema.FAVORITE_CATEGORY: np.int32(2)}


def align_transform(vocab, events, window=6, max_answer_tokens=120):
  cfg = ex.ExampleConfig(tasks=(prompts.FAVORITE_CATEGORY,), window=window, max_categories=1,
                         max_prompt_tokens=200)
  return alignment.AlignExample(vocab, prompts.byte_level_tokenizer(), cfg,
                                alignment.AlignConfig(events=events,
                                                      max_answer_tokens=max_answer_tokens))


def answer_of(example, tok):
  start = int(example[ex.PROMPT_LENGTH])
  ids = example[ex.TOKENS][start:start + int(example[ex.ANSWER_LENGTH])]
  assert int(ids[-1]) == prompts.end_token(tok)
  return tok.decode([int(t) for t in ids[:-1]])


@pytest.mark.parametrize("items, events, expected", [
    # The last event (index -1) is the record's target: it is not part of the history.
    ([2, 3, 4, 5, 6, 7], 3, ["Heat (1995)", "Up (2009)", "Jaws (1975)"]),
    # Fewer events than asked: all of them.
    ([8, 2, 3], 5, ["Ran (1985)", "Alien (1979)"]),
    # A longer timeline than the window (6): only the events the encoder reads.
    ([2, 3, 4, 5, 6, 7, 8, 2, 3, 4], 10, ["Up (2009)", "Jaws (1975)", "Big (1988)",
                                          "Ran (1985)", "Alien (1979)", "Aliens (1986)"]),
    # Out-of-vocabulary events have no title and are left out.
    ([2, 1, 3, 4], 3, ["Alien (1979)", "Aliens (1986)"]),
])
def test_examples_render_the_recent_titles(vocab, items, events, expected):
  transform = align_transform(vocab, events)
  out = transform.map(record(items))
  tok = transform.tokenizer
  assert answer_of(out, tok) == "Recent: " + "; ".join(expected)
  # Loss on the answer and its end token only; the prompt is the fixed question.
  length = int(out[ex.PROMPT_LENGTH]) + int(out[ex.ANSWER_LENGTH])
  assert out[ex.LOSS_MASK].sum() == int(out[ex.ANSWER_LENGTH])
  assert not out[ex.LOSS_MASK][:int(out[ex.PROMPT_LENGTH])].any()
  assert out[ex.TEXT_MASK].sum() == length and out[ex.TOKENS].shape == (transform.text_length,)
  prompt = tok.decode([int(t) for t in out[ex.TOKENS][:int(out[ex.PROMPT_LENGTH])]])
  assert f"Write out the last {events} movies" in prompt
  # Outside the tasks' ids: no per-task loss, no item-head loss.
  assert int(out[ex.TASK_ID]) == alignment.ALIGN_TASK_ID >= len(prompts.TASKS)
  # The encoder reads exactly the record's task features.
  crop = T.CropAndPad(6, 1).map(record(items))
  for key in (T.INPUTS_ITEM, T.MASK, T.INPUTS_TIME, T.LAST_INDEX):
    np.testing.assert_array_equal(out[key], crop[key])
  # The titles are the ones of the last valid encoder inputs.
  n = int(crop[T.MASK].sum())
  assert [vocab.items[int(i)].title for i in crop[T.INPUTS_ITEM][max(n - events, 0):n]
          if i >= schema.FIRST_ID] == expected


def test_answer_is_cut_and_a_history_without_titles_trains_nothing(vocab):
  out = align_transform(vocab, 5, max_answer_tokens=10).map(record([2, 3, 4, 5]))
  assert int(out[ex.ANSWER_LENGTH]) == 11  # 10 answer tokens + the end token
  empty = align_transform(vocab, 5).map(record([1, 1, 3]))
  assert not empty[ex.HAS_ANSWER] and not empty[ex.LOSS_MASK].any()


def test_bad_align_keys_are_named():
  config = user_llm_movielens.get_config("smoke")
  config.align.trainable = ("projection", "llm")
  with pytest.raises(config_lib.ConfigError, match=r"align\.trainable.*'llm'"):
    train_user_llm.align_config(config)
  config.align.trainable = ("projection",)
  config.align.steps = -1
  with pytest.raises(config_lib.ConfigError, match=r"align\.steps"):
    train_user_llm.align_config(config)
  # A config saved before the section existed: no alignment stage.
  del config["align"]
  assert not train_user_llm.align_config(config).enabled


CATEGORIES = ("<pad>", "<oov>", "Gift Cards", "Drama", "review: five stars",
              "review: came on time.")


def category_record(cats_per_event):
  n = len(cats_per_event)
  out = record([2 + i % len(TITLES) for i in range(n)])
  out[schema.CATEGORY_IDS] = np.asarray([c for e in cats_per_event for c in e], np.int32)
  out[schema.CATEGORY_LENGTHS] = np.asarray([len(e) for e in cats_per_event], np.int32)
  return out


@pytest.mark.parametrize("cats, events, max_categories, expected", [
    # Summary categories lose their prefix; an event's names keep their slot order; the
    # last event is the target and is not written.
    ([[4, 2], [2], [5, 2, 3], [4, 2]], 3, 3,
     ["five stars, Gift Cards", "Gift Cards", "came on time., Gift Cards, Drama"]),
    # Only the slots the encoder reads (`max_categories`).
    ([[5, 2, 3], [4, 2]], 3, 1, ["came on time."]),
    # Reserved / out-of-vocabulary ids are skipped, and an event left without a real
    # category is left out.
    ([[1], [4, 1], [0], [2]], 5, 2, ["five stars"]),
])
def test_category_examples_write_the_events_category_words(vocab, cats, events,
                                                           max_categories, expected):
  vocab = schema.Vocabulary(dataset="amazon", items=vocab.items, ratings=vocab.ratings,
                            categories=CATEGORIES)
  cfg = ex.ExampleConfig(tasks=(prompts.FAVORITE_CATEGORY,), window=6,
                         max_categories=max_categories, max_prompt_tokens=200,
                         dataset="amazon")
  transform = alignment.AlignExample(
      vocab, prompts.byte_level_tokenizer(), cfg,
      alignment.AlignConfig(events=events, content="categories", max_answer_tokens=120))
  out = transform.map(category_record(cats))
  tok = transform.tokenizer
  assert answer_of(out, tok) == "Recent: " + "; ".join(expected)
  prompt = tok.decode([int(t) for t in out[ex.TOKENS][:int(out[ex.PROMPT_LENGTH])]])
  assert f"Write out the categories of the last {events} products" in prompt
  # The inputs the encoder reads are the task's.
  crop = T.CropAndPad(6, max_categories).map(category_record(cats))
  np.testing.assert_array_equal(out[T.INPUTS_CATEGORY], crop[T.INPUTS_CATEGORY])


def test_an_unknown_content_is_named():
  with pytest.raises(ValueError, match=r"align\.content='genres'.*'titles', 'categories'"):
    alignment.AlignConfig(content="genres")


def smoke_config(data_dirs, **changes):
  config = user_llm_movielens.get_config("smoke")
  changes = {**data_dirs, "tasks.names": ("favorite_category",), "eval.num_examples": 3,
             "eval.shuffled_control": False, "train.num_steps": 2, **changes}
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    node = config
    for part in section.split(".") if section else ():
      node = node[part]
    node[name] = value
  return config


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("align_data")
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  prepared.prepare(user_llm_movielens.get_config("smoke").data, str(root))
  return {"data.manual_dir": str(root / "raw"), "data.data_dir": str(root / "data")}


def params_by_path(model):
  return {params_lib.param_path(p): np.array(v) for p, v in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


@pytest.mark.slow
@pytest.mark.parametrize("trainable, use_perceiver, content", [
    (("cross_attention",), False, "titles"),
    (("projection", "perceiver", "cross_attention"), True, "titles"),
    (("encoder", "projection", "cross_attention"), False, "titles"),
    # The categories' words, read through `bridge.category_text` (its fixed table and
    # its gain, outside the named modules, stay as they are).
    (("projection", "cross_attention"), False, "categories"),
])
def test_alignment_trains_only_the_modules_it_names(tmp_path, data_dirs, trainable,
                                                    use_perceiver, content):
  config = smoke_config(data_dirs, **{
      "align.steps": 2, "align.trainable": trainable, "bridge.use_perceiver": use_perceiver,
      "align.content": content, "bridge.category_text": content == "categories",
      "bridge.item_head": True,
      # Open gates: every bridge parameter receives gradient from the first step.
      "bridge.xattn_gate_init": 0.5})
  train_cfg, mesh, rules = setup.start(config, str(tmp_path))
  data = runner.load(config, str(tmp_path))
  with sharding.axis_rules(rules, mesh):
    model, tokenizer, _, arch = train_user_llm.build(config, data)
    transform = ex.TaskExample(data.vocab, tokenizer,
                               runner.example_config(config, vocab=data.vocab))
    before = params_by_path(model)
    out = train_user_llm.align_stage(
        model, tokenizer, data, transform, config, train_user_llm.align_config(config),
        train_cfg, mesh=mesh, rules=rules, workdir=str(tmp_path),
        fingerprint=config_lib.fingerprint(config, architecture=arch), description={})
  after = params_by_path(model)
  assert out["steps"] == 2 and len(out["history"]) == 1 and out["history"][0]["step"] == 2
  assert out["content"] == content
  prefixes = {"encoder": "encoder/", "projection": "bridge/projection/",
              "perceiver": "bridge/perceiver/", "cross_attention": "llm/cross_attention/"}
  named = tuple(prefixes[m] for m in trainable)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed, "the alignment stage changed nothing"
  frozen_changed = sorted(k for k in changed if not k.startswith(named))
  assert not frozen_changed, f"parameters outside {trainable} changed: {frozen_changed[:5]}"
  # Every named module moved (its parameters reached by the loss: the encoder's
  # pretraining heads are not).
  for prefix in named:
    assert any(k.startswith(prefix) for k in changed), f"{prefix} did not train"
  assert out["trainable_params"] == sum(before[k].size for k in before if k.startswith(named))
  assert (tmp_path / "align" / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_a_selection_the_model_lacks_is_refused(tmp_path, data_dirs):
  config = smoke_config(data_dirs, **{"align.steps": 2, "align.trainable": ("perceiver",)})
  with pytest.raises(config_lib.ConfigError, match=r"align\.trainable.*selects no parameter"):
    train_user_llm.run(config, str(tmp_path))


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory, data_dirs):
  """An uninterrupted run: 4 alignment steps (checkpoints 3, 4), then 2 task steps."""
  workdir = tmp_path_factory.mktemp("aligned")
  summary = train_user_llm.run(smoke_config(data_dirs, **{"align.steps": 4}), str(workdir))
  return workdir, summary


def strip_timing(metrics):
  timing = ("eval_sec", "sec_per_answer")
  return {method: {task: {k: v for k, v in m.items() if k not in timing}
                   for task, m in by_task.items()} for method, by_task in metrics.items()}


@pytest.mark.slow
def test_aligned_run_records_its_stage(aligned_run):
  workdir, summary = aligned_run
  align = summary["align"]
  assert align["steps"] == 4 and align["resumed_from"] is None
  assert [h["step"] for h in align["history"]] == [2, 4]
  assert all(np.isfinite(h["loss"]) and "token_accuracy" in h for h in align["history"])
  assert summary["budget"]["align_steps"] == 4 and summary["steps"] == 2
  assert sorted(p.name for p in (workdir / "align" / "checkpoints").iterdir()) == ["3", "4"]
  assert "alignment: 4 steps" in (workdir / "summary.txt").read_text()
  assert (workdir / "loss.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["during", "after"])
def test_a_run_killed_during_or_after_alignment_resumes_exactly(aligned_run, tmp_path,
                                                                data_dirs, kept):
  workdir, summary = aligned_run
  run2 = tmp_path / "resumed"
  shutil.copytree(workdir / "align" / "checkpoints", run2 / "align" / "checkpoints")
  if kept == "during":
    shutil.rmtree(run2 / "align" / "checkpoints" / "4")  # killed at step 4 of 4
  resumed = train_user_llm.run(smoke_config(data_dirs, **{"align.steps": 4}), str(run2))
  assert resumed["align"]["resumed_from"] == (3 if kept == "during" else 4)
  assert resumed["resumed_from"] is None  # the task stage had not saved yet
  assert resumed["align"]["history"] == summary["align"]["history"]
  assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in summary["history"]]
  assert resumed["trainable_checksum"] == summary["trainable_checksum"]
  assert strip_timing(resumed["metrics"]) == strip_timing(summary["metrics"])


@pytest.mark.slow
def test_a_finished_run_reruns_without_aligning_again(aligned_run, data_dirs):
  workdir, summary = aligned_run
  again = train_user_llm.run(smoke_config(data_dirs, **{"align.steps": 4}), str(workdir))
  assert again["align"]["history"] == summary["align"]["history"]
  assert again["align"]["train_sec"] == 0.0 and again["resumed_from"] == 2
  assert again["trainable_checksum"] == summary["trainable_checksum"]
