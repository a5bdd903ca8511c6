r"""Dual-encoder baseline (user tower vs item tower, in-batch softmax) on MovieLens timelines.

Synthetic default (the job generates MovieLens-format data into WORKDIR/raw):

  python -m experiments.main --config=experiments/configs/dual_encoder_movielens.py:smoke \
      --workdir=/tmp/dual_smoke

Real MovieLens, leave-last-out (last event test, second-last validation):

  python -m experiments.main --config=experiments/configs/dual_encoder_movielens.py \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/dual_ml

Paper protocol (sliding windows of 50, each user's last window is test):

  python -m experiments.main --config=experiments/configs/dual_encoder_movielens.py:paper \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/dual_ml_paper

Variants: '' (user tower 2 x 128, window 50, batch 64, leave-last-out), 'paper' (paper
protocol, otherwise the same), 'smoke' (tiny, ~300 synthetic users, seconds on a CPU).
`encoder.model.*` is the user tower (an EncoderConfig; None keeps the preset's value),
`dual_encoder.*` the towers' shared space, item tower and loss.
"""

import ml_collections

from experiments.configs import common
from user_llm_jax import config as config_lib
from user_llm_jax.baselines import dual_encoder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('', 'paper' or 'smoke')."""
  config = ml_collections.ConfigDict()
  config.job = "dual_encoder"
  config.name = "dual_encoder_movielens"
  config.seed = 0
  config.data = common.movielens_data_section(protocol="leave_last_out", window=50)

  # The user tower. 2 layers keep a CPU run to minutes; the paper encoder is 6 x 128.
  config.encoder = ml_collections.ConfigDict()
  config.encoder.model = common.encoder_model_section("paper", num_layers=2, dropout=0.2)
  config.dual_encoder = config_lib.dataclass_section(dual_encoder.DualEncoderConfig)
  config.dual_encoder.update(output_dim=64, temperature=0.05, train_positions="all")

  config.train = common.train_section(
      batch_size=64, num_steps=1000, learning_rate=1e-3, warmup=100, log_every=50,
      eval_every=500, checkpoint_every=500, keep_checkpoints=2)
  config.mesh = common.mesh_section()
  config.eval = common.eval_section(batch_size=256)

  variant = arg or ""
  if variant == "paper":
    config.name = "dual_encoder_movielens:paper"
    config.data.protocol = "paper"
  elif variant == "smoke":
    config.name = "dual_encoder_movielens:smoke"
    config.data.window = 20
    config.data.synthetic.update(num_users=300, num_items=200, events_per_user_mean=40.0)
    config.encoder.model.update(preset="tiny", num_layers=1, width=32, num_heads=2, mlp_dim=64,
                        feature_dim=16, dropout=0.0)
    config.dual_encoder.update(output_dim=32, item_dim=32, category_dim=16, item_hidden=64)
    config.train.update(batch_size=32, num_steps=60, learning_rate=3e-3, warmup=10,
                        log_every=20, eval_every=0, checkpoint_every=60)
    config.eval.batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dual_encoder_movielens; known: '', "
                     "'paper', 'smoke'")
  return config
