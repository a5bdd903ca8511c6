r"""Pretrain the multimodal user encoder on MovieLens-format timelines (leave-last-out).

Synthetic default (no download: the job generates a MovieLens-format dataset into
WORKDIR/raw with a fixed seed and prepares it into WORKDIR/data):

  python -m experiments.main --config=experiments/configs/encoder_movielens.py:smoke \
      --workdir=/tmp/encoder_smoke

Real MovieLens (any layout the MovieLens reader knows, e.g. ml-latest-small):

  python -m experiments.main --config=experiments/configs/encoder_movielens.py \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/encoder_ml

Variants (`:name` after the file): '' (paper-size encoder 6 x 128, window 50, batch 128),
'smoke' (tiny encoder, ~300 synthetic users, about a minute on 2 CPU cores).
Any key can be overridden: `--config.train.num_steps=500 --config.model.num_layers=2`.
Model keys left at None take the preset's value (`model.preset`: 'paper' or 'tiny').
"""

import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax.encoder import config as encoder_config

# Vocabulary sizes come from the prepared dataset, never from the config.
_DATA_FIXED = ("num_items", "num_ratings", "num_categories", "num_time_buckets", "max_len",
               "max_categories")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('' or None: default, 'smoke')."""
  config = ml_collections.ConfigDict()
  config.job = "pretrain_encoder"
  config.name = "encoder_movielens"
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "movielens"
  config.data.manual_dir = ""     # Empty: generate the synthetic dataset into WORKDIR/raw.
  config.data.data_dir = ""       # Empty: prepare into WORKDIR/data.
  config.data.protocol = "leave_last_out"
  config.data.window = 50         # Events the encoder reads (E).
  config.data.max_categories = 10  # Genre slots per event.
  config.data.worker_count = 0    # Grain worker processes.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_users = 2000
  config.data.synthetic.num_items = 1000
  config.data.synthetic.events_per_user_mean = 80.0
  config.data.synthetic.seed = 0

  config.model = config_lib.dataclass_section(
      encoder_config.EncoderConfig, exclude=_DATA_FIXED, preset="paper")

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.num_steps = 3000
  config.train.learning_rate = 1e-3
  config.train.warmup = 200
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 3

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices.
  config.mesh.axis_names = ("data", "fsdp", "tensor")
  config.mesh.rules = ()          # Empty: user_llm_jax.sharding.DEFAULT_RULES.

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.ks = (1, 5, 10)

  variant = arg or ""
  if variant == "smoke":
    config.name = "encoder_movielens:smoke"
    config.data.window = 30
    config.data.synthetic.num_users = 300
    config.data.synthetic.num_items = 300
    config.data.synthetic.events_per_user_mean = 60.0
    config.model.preset = "tiny"
    config.model.num_layers = 2
    config.model.width = 64
    config.model.num_heads = 2
    config.model.mlp_dim = 128
    config.model.feature_dim = 32
    config.model.dropout = 0.1
    config.train.batch_size = 32
    config.train.num_steps = 300
    config.train.learning_rate = 3e-3
    config.train.warmup = 30
    config.train.log_every = 25
    config.train.eval_every = 150
    config.train.checkpoint_every = 100
    config.eval.batch_size = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of encoder_movielens; known: '', 'smoke'")
  return config
