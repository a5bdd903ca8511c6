"""Encoder-only baselines compared with User-LLM (the dual encoder)."""

from user_llm_jax.baselines.dual_encoder import DualEncoder, DualEncoderConfig

__all__ = ["DualEncoder", "DualEncoderConfig"]
