"""Run fingerprints: one function, the keys that change a result, a clear resume refusal."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import encoder_movielens
from experiments.configs import main as main_config
from user_llm_jax import config as config_lib
from user_llm_jax.train import checkpointing


def test_fingerprint_keeps_result_keys_and_drops_harmless_ones():
  config = encoder_movielens.get_config("smoke")
  base = config_lib.fingerprint(config)
  assert base["train"]["learning_rate"] == config.train.learning_rate
  assert base["train"]["num_steps"] == config.train.num_steps
  assert base["encoder"]["model"]["width"] == 64
  for harmless in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every"):
    assert harmless not in base["train"]
  assert "eval" not in base and "mesh" not in base and "name" not in base
  changed = encoder_movielens.get_config("smoke")
  changed.train.log_every = 7
  changed.mesh.shape = (1, -1, 1)
  changed.data.worker_count = 2
  assert config_lib.fingerprint(changed) == base


def test_keys_added_later_match_runs_saved_before_them_only_at_the_old_behaviour():
  # A run saved before `input_norm` / `init_std` existed has neither key in its config
  # nor in its encoder architecture; today's config at the old behaviour must match it.
  config = encoder_movielens.get_config("smoke")
  arch = {"width": 64, "input_norm": False, "init_std": 0.0}
  saved = {**config_lib.fingerprint(config), "encoder_architecture": {"width": 64}}
  saved["encoder"]["model"] = {k: v for k, v in saved["encoder"]["model"].items()
                               if k not in ("input_norm", "init_std")}
  now = config_lib.fingerprint(config, encoder_architecture=arch)
  assert config_lib.differing_keys(saved, now) == []
  config.encoder.model.input_norm = True
  changed = config_lib.fingerprint(config, encoder_architecture=dict(arch, input_norm=True))
  assert config_lib.differing_keys(saved, changed) == [
      "encoder.model.input_norm", "encoder_architecture.input_norm"]


def test_soft_prompt_options_count_only_in_soft_prompt_mode():
  # A cross-attention run saved before `item_head_skip` / `soft_prompt_norm` existed still
  # matches today's config (the soft prompt's norm is on by default but not read there).
  config = main_config.get_config("")
  config.bridge.item_head_skip = False  # the old behaviour (the main job's default is True)
  bridge = {"mode": "cross_attention", "item_head": True}
  new = {"item_head_skip": False, "soft_prompt_norm": True, "pooled_context": False,
         "standardize_states": False}
  saved = config_lib.fingerprint(config, architecture={"bridge": bridge})
  for key in new:
    saved["bridge"].pop(key, None)
  now = config_lib.fingerprint(config, architecture={"bridge": {**bridge, **new}})
  assert config.bridge.soft_prompt_norm is True
  assert config_lib.differing_keys(saved, now) == []
  # A soft-prompt run reads it: one saved without the norm differs from today's default.
  config.bridge.mode = "soft_prompt"
  soft = dict(bridge, mode="soft_prompt")
  saved = config_lib.fingerprint(config, architecture={"bridge": soft})
  saved["bridge"].pop("soft_prompt_norm")
  now = config_lib.fingerprint(config, architecture={"bridge": {**soft, **new}})
  assert config_lib.differing_keys(saved, now) == [
      "architecture.bridge.soft_prompt_norm", "bridge.soft_prompt_norm"]


def test_relative_and_absolute_paths_fingerprint_alike(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  a = main_config.get_config("smoke")
  a.data.data_dir = "prepared"
  b = main_config.get_config("smoke")
  b.data.data_dir = str(tmp_path / "prepared")
  assert config_lib.fingerprint(a) == config_lib.fingerprint(b)


def test_resume_with_a_changed_learning_rate_is_refused_naming_the_key(tmp_path):
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  state = nnx.state((model, opt))
  config = encoder_movielens.get_config("smoke")
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1,
                                    fingerprint=config_lib.fingerprint(config),
                                    description={"job": "test"})
  ckpt.save(1, state)
  ckpt.close()
  config.train.learning_rate *= 2
  again = checkpointing.Checkpointer(str(tmp_path), every=1,
                                     fingerprint=config_lib.fingerprint(config))
  with pytest.raises(checkpointing.CheckpointError, match=r"train\.learning_rate: checkpoint"):
    again.restore(state)
  again.close()
  config.train.learning_rate /= 2
  config.train.log_every = 3
  ok = checkpointing.Checkpointer(str(tmp_path), every=1,
                                  fingerprint=config_lib.fingerprint(config))
  _, _, step = ok.restore(state)
  ok.close()
  assert step == 1
  assert checkpointing.read_description(str(tmp_path)) == {"job": "test"}


def test_restore_params_reads_the_model_item_alone_and_names_mismatches(tmp_path):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1)
  ckpt.save(4, nnx.state((model, opt)))
  ckpt.close()
  names = {p.name for p in (tmp_path / "4").iterdir()}
  assert {"meta", "model", "opt"} <= names
  fresh = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
  assert checkpointing.restore_params(fresh, str(tmp_path)) == 4
  np.testing.assert_array_equal(np.asarray(fresh.kernel[...]), np.asarray(model.kernel[...]))
  wrong = nnx.Linear(5, 2, rngs=nnx.Rngs(1))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"kernel: checkpoint has shape \(3, 2\)"):
    checkpointing.restore_params(wrong, str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    checkpointing.restore_params(fresh, str(tmp_path / "none"))


def test_differing_keys_names_a_key_present_on_one_side_only_even_when_none():
  old = {"encoder": {"model": {"width": 64}}, "seed": 0}
  new = {"encoder": {"model": {"width": 64, "use_rating": None}}, "seed": 0}
  assert config_lib.differing_keys(old, new) == ["encoder.model.use_rating"]
  assert config_lib.differing_keys(new, old) == ["encoder.model.use_rating"]
  assert config_lib.differing_keys(new, dict(new)) == []
  changed = {"encoder": {"model": {"width": 32, "use_rating": None}}, "seed": 0}
  assert config_lib.differing_keys(new, changed) == ["encoder.model.width"]


def test_refit_key_counts_only_when_on():
  # Encoder runs saved before `data.train_through_validation` existed match today's
  # default (off); a refit differs from them by that key alone.
  config = encoder_movielens.get_config("kcore")
  saved = config_lib.fingerprint(config)
  assert "train_through_validation" not in saved["data"]
  config.data.train_through_validation = True
  assert config_lib.differing_keys(saved, config_lib.fingerprint(config)) == [
      "data.train_through_validation"]


def test_a_key_saved_at_its_omitted_value_matches_its_absence():
  # A run saved while the key was still recorded at its old-behaviour value matches
  # today's fingerprint, which leaves it out; any other value is named.
  config = encoder_movielens.get_config("kcore")
  now = config_lib.fingerprint(config)
  saved = {**now, "data": {**now["data"], "train_through_validation": False}}
  assert config_lib.differing_keys(saved, now) == []
  saved["data"]["train_through_validation"] = True
  assert config_lib.differing_keys(saved, now) == ["data.train_through_validation"]
  saved["data"]["train_through_validation"] = 0   # not the same type: named too
  assert config_lib.differing_keys(saved, now) == ["data.train_through_validation"]
