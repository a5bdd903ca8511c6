"""Multimodal autoregressive user encoder: config, model, fusion variants, losses."""

from user_llm_jax.encoder.config import ENCODER_PAPER, ENCODER_TINY, EncoderConfig
from user_llm_jax.encoder.model import UserEncoder
