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
`model.*` is the user tower (an EncoderConfig; None keeps the preset's value),
`dual_encoder.*` the towers' shared space, item tower and loss.
"""

import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax.baselines import dual_encoder
from user_llm_jax.encoder import config as encoder_config

_DATA_FIXED = ("num_items", "num_ratings", "num_categories", "num_time_buckets", "max_len",
               "max_categories")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('', 'paper' or 'smoke')."""
  config = ml_collections.ConfigDict()
  config.job = "dual_encoder"
  config.name = "dual_encoder_movielens"
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "movielens"
  config.data.manual_dir = ""     # Empty: generate the synthetic dataset into WORKDIR/raw.
  config.data.data_dir = ""       # Empty: prepare into WORKDIR/data.
  config.data.protocol = "leave_last_out"
  config.data.window = 50
  config.data.max_categories = 10
  config.data.worker_count = 0
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_users = 2000
  config.data.synthetic.num_items = 1000
  config.data.synthetic.events_per_user_mean = 80.0
  config.data.synthetic.seed = 0

  # The user tower. 2 layers keep a CPU run to minutes; the paper encoder is 6 x 128.
  config.model = config_lib.dataclass_section(
      encoder_config.EncoderConfig, exclude=_DATA_FIXED, preset="paper")
  config.model.num_layers = 2
  config.model.dropout = 0.2
  config.dual_encoder = config_lib.dataclass_section(dual_encoder.DualEncoderConfig)
  config.dual_encoder.output_dim = 64
  config.dual_encoder.temperature = 0.05
  config.dual_encoder.train_positions = "all"

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64
  config.train.num_steps = 1000
  config.train.learning_rate = 1e-3
  config.train.warmup = 100
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)
  config.mesh.axis_names = ("data", "fsdp", "tensor")
  config.mesh.rules = ()

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.ks = (1, 5, 10)

  variant = arg or ""
  if variant == "paper":
    config.name = "dual_encoder_movielens:paper"
    config.data.protocol = "paper"
  elif variant == "smoke":
    config.name = "dual_encoder_movielens:smoke"
    config.data.window = 20
    config.data.synthetic.num_users = 300
    config.data.synthetic.num_items = 200
    config.data.synthetic.events_per_user_mean = 40.0
    config.model.preset = "tiny"
    config.model.num_layers = 1
    config.model.width = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.feature_dim = 16
    config.model.dropout = 0.0
    config.dual_encoder.output_dim = 32
    config.dual_encoder.item_dim = 32
    config.dual_encoder.category_dim = 16
    config.dual_encoder.item_hidden = 64
    config.train.batch_size = 32
    config.train.num_steps = 60
    config.train.learning_rate = 3e-3
    config.train.warmup = 10
    config.train.log_every = 20
    config.train.eval_every = 0
    config.train.checkpoint_every = 60
    config.eval.batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dual_encoder_movielens; known: '', "
                     "'paper', 'smoke'")
  return config
