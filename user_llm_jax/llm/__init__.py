"""Llama-family decoder LLM: model, checkpoints (GGUF, safetensors, Orbax), tokenizer, LoRA.

Public API (submodules hold the rest):
  Decoder, KVCache              model.py: the decoder and its KV cache
  LlmConfig, PRESETS            config.py: architectures (SmolLM2, Llama 3.2, tiny)
  load_llm                      loading.py: 'smollm2' | .gguf | HF dir | Orbax dir | 'random'
  Tokenizer                     tokenizer.py: byte-level BPE from GGUF or tokenizer.json
  LoraConfig, apply_lora, ...   lora.py: adapters, `LoraParam` filter, merge
  token_perplexity, ...         perplexity.py: strided perplexity
"""

from user_llm_jax.llm.config import (LLAMA_3_2_1B, LLAMA_3_2_3B, LLM_TINY, PRESETS,
                                     SMOLLM2_135M, SMOLLM2_360M, SMOLLM2_1_7B, LlmConfig,
                                     RopeScaling, get_preset)
from user_llm_jax.llm.model import (Decoder, KVCache, causal_mask,
                                    create_sharded, decoder_from_params, decoder_params)

__all__ = [
    "LLAMA_3_2_1B", "LLAMA_3_2_3B", "LLM_TINY", "PRESETS", "SMOLLM2_135M", "SMOLLM2_360M",
    "SMOLLM2_1_7B", "LlmConfig", "RopeScaling", "get_preset",
    "Decoder", "KVCache", "causal_mask", "create_sharded",
    "decoder_from_params", "decoder_params",
]
