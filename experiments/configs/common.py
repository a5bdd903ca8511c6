"""Config sections shared by the experiment configs: data, encoder model, train, eval, mesh.

Each helper builds one section with every key its job reads, so all configs expose the same
keys (and override types) for a section. The values that differ between experiments are
arguments without a default, so a config file still shows them where it calls the helper;
defaults are only for values that every experiment shares.

Variants override a section in one call, e.g. `config.train.update(num_steps=60, warmup=10)`.
"""

import ml_collections

from user_llm_jax import config as config_lib
from user_llm_jax.encoder import config as encoder_config

# Encoder vocabulary sizes and lengths come from the prepared dataset, never from the config.
DATA_FIXED = ("num_items", "num_ratings", "num_categories", "num_time_buckets", "max_len",
              "max_categories")


def movielens_data_section(*, protocol: str, window: int,
                           max_categories: int = 10) -> ml_collections.ConfigDict:
  """The `data` section of a MovieLens-format dataset (synthetic unless `manual_dir` is set).

  Args:
    protocol: 'leave_last_out' or 'paper' (sliding windows, last window is test).
    window: events the encoder reads (E).
    max_categories: genre slots per event.
  """
  data = ml_collections.ConfigDict()
  data.dataset = "movielens"
  data.manual_dir = ""        # Empty: generate the synthetic dataset into WORKDIR/raw.
  data.data_dir = ""          # Empty: prepare into WORKDIR/data.
  data.protocol = protocol
  data.window = window
  data.max_categories = max_categories
  data.kcore_users = 0        # > 0: iterative k-core filtering (users with >= k events,
  data.kcore_items = 0        #   items with >= k events), the recommender-systems protocol.
  data.timestamp_precision = "exact"  # 'float32': RecBole's rounding (ties keep file order).
  # > 0: review summaries of at least this many training events become per-event
  # categories (user_llm_jax/data/text_categories.py); 0: off.
  data.text_categories = 0
  data.max_text_categories = 0  # > 0: only the commonest this many summaries (0: all).
  data.worker_count = 0       # Grain worker processes.
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.num_users = 2000
  data.synthetic.num_items = 1000
  data.synthetic.events_per_user_mean = 80.0
  data.synthetic.seed = 0
  return data


def encoder_model_section(preset: str, **values) -> ml_collections.ConfigDict:
  """The user encoder's EncoderConfig keys (None: the preset's value), `values` set.

  Args:
    preset: 'paper' or 'tiny', the architecture the unset keys come from.
    **values: keys set in the config (e.g. num_layers=2).
  """
  return config_lib.dataclass_section(
      encoder_config.EncoderConfig, exclude=DATA_FIXED, preset=preset, **values)


def train_section(*, batch_size: int, num_steps: int, learning_rate: float, warmup: int,
                  log_every: int, eval_every: int, checkpoint_every: int,
                  keep_checkpoints: int, weight_decay: float = 0.01, grad_clip: float = 1.0,
                  **extra) -> ml_collections.ConfigDict:
  """The `train` section (the `trainer.TrainConfig` keys, documented there).

  Args:
    batch_size, num_steps, learning_rate, warmup, log_every, eval_every, checkpoint_every,
      keep_checkpoints, weight_decay, grad_clip: the TrainConfig fields.
    **extra: keys appended after them (e.g. lr_mults).
  """
  train = ml_collections.ConfigDict()
  train.batch_size = batch_size
  train.num_steps = num_steps
  train.learning_rate = learning_rate
  train.warmup = warmup
  train.weight_decay = weight_decay
  train.grad_clip = grad_clip
  train.log_every = log_every
  train.eval_every = eval_every
  train.checkpoint_every = checkpoint_every
  train.keep_checkpoints = keep_checkpoints
  train.update(extra)
  return train


def eval_section(*, batch_size: int, ks: tuple[int, ...] = (1, 5, 10),
                 **extra) -> ml_collections.ConfigDict:
  """The `eval` section: batch size, the k of Recall@k, then job-specific keys (`extra`)."""
  evaluation = ml_collections.ConfigDict()
  evaluation.batch_size = batch_size
  evaluation.ks = ks
  evaluation.update(extra)
  return evaluation


def mesh_section(shape: tuple[int, ...] = (-1, 1, 1)) -> ml_collections.ConfigDict:
  """The `mesh` section: device mesh shape over (data, fsdp, tensor) and sharding rules.

  Args:
    shape: devices per mesh axis; -1 takes the remaining devices.
  """
  mesh = ml_collections.ConfigDict()
  mesh.shape = shape
  mesh.axis_names = ("data", "fsdp", "tensor")
  mesh.rules = ()             # Empty: user_llm_jax.sharding.DEFAULT_RULES.
  return mesh


def aot_section(num_items: int = 0, num_ratings: int = 0,
                num_categories: int = 0) -> ml_collections.ConfigDict:
  """The `aot` section: the target dataset's vocabulary sizes (reserved ids included).

  Read only by the ahead-of-time compile check (`experiments/compile_check.py`), which
  sizes the models without the prepared data; a run takes its sizes from the data. 0: not
  set (the compile check asks for them).
  """
  aot = ml_collections.ConfigDict()
  aot.num_items = num_items
  aot.num_ratings = num_ratings
  aot.num_categories = num_categories
  return aot
