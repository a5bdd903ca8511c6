"""Config validation: unknown keys and wrong types fail at start-up with a one-line message."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from user_llm_jax import config as config_lib
from user_llm_jax import jobs
from user_llm_jax.jobs import launcher
from user_llm_jax.jobs import pretrain_encoder
from user_llm_jax.train import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "encoder_movielens.py"


def launch(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  for fragment in fragments:
    assert fragment in last, proc.stderr
  return last


def launch_in_process(*args: str) -> str:
  """Parses flags and validates as `experiments/main.py` does; returns the exit message."""
  # Fresh flags (the same definitions as experiments/main.py) for every launch.
  fv = flags.FlagValues()
  # Overrides are discovered from the argument list when the flag is defined.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=["main", *args])
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  with pytest.raises(SystemExit) as exc:
    launcher.parse_flags(["main", *args], flag_values=fv)
    launcher.run(fv["config"].value, workdir=fv.workdir, mode="train",
                 config_file=config_flags.get_config_filename(fv["config"]))
  message = str(exc.value.code)
  assert message.startswith("error:"), message
  return message.splitlines()[0]


def test_unknown_override_key_through_the_cli(tmp_path):
  # The real command line: one line on stderr, no traceback, non-zero exit, nothing started.
  proc = launch(f"--config={CONFIG}:smoke", "--config.encoder.model.widht=3",
                f"--workdir={tmp_path}")
  last = assert_clean_error(proc, "'encoder.model.widht'", "valid keys of encoder.model",
                            "width", "num_layers")
  assert last.startswith("error:")
  assert not any(tmp_path.iterdir())


def test_unknown_override_section_and_wrong_type(tmp_path):
  msg = launch_in_process(f"--config={CONFIG}", "--config.trian.num_steps=3",
                          f"--workdir={tmp_path}")
  assert "'trian'" in msg and "train" in msg and "encoder" in msg
  msg = launch_in_process(f"--config={CONFIG}", "--config.train.num_steps=many",
                          f"--workdir={tmp_path}")
  assert "config.train.num_steps" in msg and "many" in msg
  msg = launch_in_process(f"--config={CONFIG}:nosuchvariant", f"--workdir={tmp_path}")
  assert "nosuchvariant" in msg and "smoke" in msg


def test_typo_in_config_file_variant(tmp_path):
  # A variant that sets a key its own get_config() does not define.
  bad = tmp_path / "bad_config.py"
  bad.write_text(
      f"import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('base', {str(CONFIG)!r})\n"
      "base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)\n"
      "def get_config(arg=None):\n"
      "  config = base.get_config()\n"
      "  if arg == 'typo':\n"
      "    config.train.lerning_rate = 0.1\n"
      "  if arg == 'badtype':\n"
      "    config.train.batch_size = 'big'\n"
      "  return config\n")
  msg = launch_in_process(f"--config={bad}:typo", f"--workdir={tmp_path / 'w'}")
  assert "'train.lerning_rate'" in msg and "learning_rate" in msg, msg
  msg = launch_in_process(f"--config={bad}:badtype", f"--workdir={tmp_path / 'w'}")
  assert "batch_size" in msg and "int" in msg, msg
  assert not (tmp_path / "w").exists()


def test_validate_in_process():
  schema = ml_collections.ConfigDict({"a": 1, "b": {"c": 0.5, "d": (1, 2), "e": "x"}})
  ok = ml_collections.ConfigDict({"a": 2, "b": {"c": 3, "d": [4], "e": "y"}})
  config_lib.validate(ok, schema)  # int for float, list for tuple are fine.
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'b\.f'.*c, d, e"):
    config_lib.validate(ml_collections.ConfigDict({"a": 1, "b": {"c": 1.0, "d": (), "e": "",
                                                                "f": 1}}), schema)
  with pytest.raises(config_lib.ConfigError, match=r"'b\.e' expects str, got int"):
    config_lib.validate(ml_collections.ConfigDict({"a": 1, "b": {"c": 1.0, "d": (), "e": 3}}),
                        schema)
  with pytest.raises(config_lib.ConfigError, match=r"'a' is missing"):
    config_lib.validate(ml_collections.ConfigDict({"b": {"c": 1.0, "d": (), "e": ""}}), schema)


def test_sections_convert_to_dataclasses_with_clear_errors():
  base = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=10, learning_rate=1, warmup=0, weight_decay=0.0, grad_clip=1.0,
      log_every=1, eval_every=0, checkpoint_every=5, keep_checkpoints=1))
  cfg = config_lib.to_dataclass(trainer_lib.TrainConfig, base, "train")
  assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
  bad = ml_collections.ConfigDict(dict(base, batch_size=0))
  with pytest.raises(config_lib.ConfigError, match="train.batch_size must be positive"):
    config_lib.to_dataclass(trainer_lib.TrainConfig, bad, "train")
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.nope'"):
    config_lib.to_dataclass(trainer_lib.TrainConfig, dict(base, nope=1), "train")


def test_encoder_config_from_preset_and_overrides():
  from user_llm_jax import models  # pylint: disable=import-outside-toplevel
  from user_llm_jax.data import schema  # pylint: disable=import-outside-toplevel
  from user_llm_jax.encoder import config as enc_lib
  import experiments.configs.encoder_movielens as cfg_file  # pylint: disable=import-outside-toplevel
  vocab = schema.Vocabulary(
      dataset="movielens", items=tuple(schema.ItemInfo(str(i), f"t{i}", ()) for i in range(50)),
      ratings=tuple(range(12)), categories=tuple(f"c{i}" for i in range(22)))
  config = cfg_file.get_config("smoke")
  enc = models.encoder_config_from(config.encoder.model, vocab, window=30, max_categories=10)
  assert (enc.num_layers, enc.width, enc.num_heads) == (2, 64, 2)
  assert enc.use_time == enc_lib.ENCODER_TINY.use_time  # Unset keys come from the preset.
  assert (enc.num_items, enc.num_ratings, enc.num_categories, enc.max_len) == (50, 12, 22, 30)
  paper = models.encoder_config_from(cfg_file.get_config().encoder.model, vocab, window=50,
                                     max_categories=10)
  assert (paper.num_layers, paper.width) == (6, 128)
  config.encoder.model.preset = "huge"
  with pytest.raises(config_lib.ConfigError, match="encoder.model.preset.*paper"):
    models.encoder_config_from(config.encoder.model, vocab, window=30, max_categories=10)
  config = cfg_file.get_config("smoke")
  config.encoder.model.num_heads = 3  # 64 is not divisible by 3.
  with pytest.raises(config_lib.ConfigError,
                     match="invalid config section 'encoder.model'.*num_heads"):
    models.encoder_config_from(config.encoder.model, vocab, window=30, max_categories=10)
  # The saved architecture rebuilds the same frozen config.
  assert models.encoder_config_from_architecture(models.architecture(encoder=enc)) == enc


def test_job_registry():
  assert jobs.resolve("pretrain_encoder", "train") is pretrain_encoder.run
  with pytest.raises(KeyError, match="registered"):
    jobs.resolve("pretrain_encoder", "nonsense")
  assert "encoder.model.widht" in launcher.explain_override_error(
      ["prog", f"--config={CONFIG}:smoke", "--config.encoder.model.widht=3"])


def test_launcher_shows_our_missing_file_errors_but_keeps_os_tracebacks(tmp_path):
  """A FileNotFoundError of ours (a message) is one line; one from the OS is a bug."""
  from user_llm_jax.jobs import launcher  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(CONFIG, "smoke")

  def ours(config, workdir):
    raise FileNotFoundError("config key 'data.manual_dir' points to nowhere")

  def os_level(config, workdir):
    open(os.path.join(workdir, "no", "such", "file"), encoding="utf-8")  # noqa: SIM115

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  for name, fn in (("_test_ours", ours), ("_test_os", os_level)):
    jobs.JOBS[name] = f"{__name__}:{fn.__name__}"
    globals()[fn.__name__] = fn
  try:
    config.job = "_test_ours"
    with pytest.raises(SystemExit, match="error: config key 'data.manual_dir'"):
      launcher.run(config, workdir=str(tmp_path), mode="train", config_file=None)
    config.job = "_test_os"
    with pytest.raises(FileNotFoundError) as exc:
      launcher.run(config, workdir=str(tmp_path), mode="train", config_file=None)
    assert exc.value.errno is not None
  finally:
    for name in ("_test_ours", "_test_os"):
      jobs.JOBS.pop(name, None)


def test_user_llm_movielens_fav_only_variant_is_the_cpu_budget_on_one_task():
  from experiments.configs import user_llm_movielens  # pylint: disable=g-import-not-at-top
  from user_llm_jax import models  # pylint: disable=g-import-not-at-top
  cpu, fav = user_llm_movielens.get_config(""), user_llm_movielens.get_config("fav_only")
  assert tuple(fav.tasks.names) == ("favorite_category",)
  bridge = models.bridge_config(fav)    # a valid bridge: no item head, so no skip
  assert not bridge.item_head and not bridge.item_head_skip
  # Everything else is the CPU variant's budget and bridge.
  for key in ("train", "data", "encoder", "llm"):
    assert fav[key].to_dict() == cpu[key].to_dict(), key
  assert fav.bridge.xattn_first == cpu.bridge.xattn_first == 15


def test_random_encoder_takes_the_named_pretraining_runs_architecture(tmp_path):
  """`encoder.init=random` with `encoder.workdir`: the pretraining run's architecture with
  fresh weights (the like-for-like ablation); without a workdir, `encoder.model`'s."""
  import types  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from experiments.configs import user_llm_movielens  # pylint: disable=import-outside-toplevel
  from user_llm_jax import models  # pylint: disable=import-outside-toplevel
  from user_llm_jax import runs  # pylint: disable=import-outside-toplevel
  from user_llm_jax.data import schema  # pylint: disable=import-outside-toplevel
  from user_llm_jax.jobs import train_user_llm  # pylint: disable=import-outside-toplevel
  vocab = schema.Vocabulary(
      dataset="movielens", items=tuple(schema.ItemInfo(str(i), f"t{i}", ()) for i in range(40)),
      ratings=tuple(range(12)), categories=tuple(f"c{i}" for i in range(8)))
  data = types.SimpleNamespace(vocab=vocab)
  config = user_llm_movielens.get_config("smoke")
  own = models.encoder_config_from(config.encoder.model, vocab, window=config.data.window,
                                   max_categories=config.data.max_categories)
  # A pretraining run whose architecture differs from `encoder.model` (depth and width).
  pretrained_model = dict(config.encoder.model.to_dict(), num_layers=own.num_layers + 1,
                          width=2 * own.width, feature_dim=2 * own.width)
  arch = models.encoder_config_from(pretrained_model, vocab, window=config.data.window,
                                    max_categories=config.data.max_categories)
  runs.save_run(str(tmp_path / "enc"), "pretrain_encoder", config,
                models.architecture(encoder=arch))
  encoder, copy = train_user_llm.user_encoder(config, data)
  assert encoder.cfg == own and copy is None
  config.encoder.workdir = str(tmp_path / "enc")
  encoder, copy = train_user_llm.user_encoder(config, data)
  assert encoder.cfg == arch and copy is None   # No checkpoint was read: none exists.
  # Fresh weights from the seed: another seed draws others.
  config.seed = 1
  other, _ = train_user_llm.user_encoder(config, data)
  first = jax.tree.leaves(nnx.state(encoder, nnx.Param))
  second = jax.tree.leaves(nnx.state(other, nnx.Param))
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))
  # The architecture must still fit the data.
  config.data.window = arch.max_len + 1
  with pytest.raises(config_lib.ConfigError, match="data.window=.*exceeds"):
    train_user_llm.user_encoder(config, data)
