"""Llama-family decoder LLM: model, checkpoints (GGUF, safetensors, Orbax), tokenizer, LoRA."""

from user_llm_jax.llm.config import LLM_TINY, PRESETS, LlmConfig, RopeScaling, get_preset
from user_llm_jax.llm.model import Decoder, KVCache, causal_mask, count_params, create_sharded

__all__ = [
    "LLM_TINY", "PRESETS", "LlmConfig", "RopeScaling", "get_preset",
    "Decoder", "KVCache", "causal_mask", "count_params", "create_sharded",
]
