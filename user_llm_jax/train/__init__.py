"""Generic training: one jitted train step, the loop, checkpointing, metrics."""

from user_llm_jax.train.checkpointing import Checkpointer
from user_llm_jax.train.checkpointing import CheckpointError
from user_llm_jax.train.checkpointing import PreemptionGuard
from user_llm_jax.train.train_step import make_tx
from user_llm_jax.train.train_step import NonFiniteError
from user_llm_jax.train.train_step import OptimConfig
from user_llm_jax.train.train_step import TrainStep
from user_llm_jax.train.trainer import train
from user_llm_jax.train.trainer import TrainConfig
from user_llm_jax.train.trainer import TrainResult
