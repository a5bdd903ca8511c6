"""Estimated forward FLOPs of contextualizing an LLM with one user, per answer.

The estimate counts matrix multiplications at 2 FLOPs per multiply-add (the usual
`2 x parameters x tokens` rule, attention scores included), for reading the user and the
prompt once, which is where User-LLM and the text prompt differ (the paper's FLOPs
comparison); decoding the answer costs both about the same and is left out. The
efficiency benchmark (`experiments/benchmarks/efficiency.py`) measures the same quantity
with XLA's cost analysis.
"""

from __future__ import annotations

from user_llm_jax.bridge.user_llm import UserLLM
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.llm.config import LlmConfig


def decoder_layer_flops(cfg: LlmConfig, tokens: float, context: float) -> float:
  """One decoder layer over `tokens` new tokens attending to `context` positions."""
  d, h = cfg.width, cfg.head_dim
  proj = 2 * tokens * d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)   # q, o, k, v
  attn = 2 * 2 * tokens * context * cfg.num_heads * h                       # scores, values
  mlp = 2 * 3 * tokens * d * cfg.mlp_dim                                    # SwiGLU
  return float(proj + attn + mlp)


def text_prompt_flops(cfg: LlmConfig, prompt_tokens: float) -> float:
  """Prefill of a prompt of `prompt_tokens` tokens (history included) through the LLM."""
  return cfg.num_layers * decoder_layer_flops(cfg, prompt_tokens, prompt_tokens / 2)


def encoder_flops(cfg: EncoderConfig, events: float) -> float:
  """The user encoder over `events` events (transformer blocks; embeddings are lookups)."""
  d = cfg.width
  per_layer = 2 * events * (4 * d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * events * events / 2 * d
  return float(cfg.num_layers * per_layer)


def user_llm_flops(model: UserLLM, prompt_tokens: float, events: float) -> float:
  """Encoder + bridge + LLM prefill of the short prompt reading the user embeddings."""
  llm_cfg, cfg = model.llm.cfg, model.cfg
  context = float(cfg.num_latents if cfg.use_perceiver else events)
  total = encoder_flops(model.encoder.cfg, events)
  total += 2 * context * model.encoder.cfg.width * llm_cfg.width * cfg.projection_layers
  if cfg.text_memory:  # one more slot per name token of every event (no projection)
    context += events * cfg.category_text_tokens
  if cfg.mode == "cross_attention":
    total += text_prompt_flops(llm_cfg, prompt_tokens)
    for block in model.llm.cross_attention.values():
      heads, head_dim = block.attn.num_heads, block.attn.head_dim
      d = llm_cfg.width
      total += 2 * prompt_tokens * d * heads * head_dim * 2            # q, o
      total += 2 * context * d * heads * head_dim * 2                  # k, v of the user
      total += 2 * 2 * prompt_tokens * context * heads * head_dim      # scores, values
      total += 2 * 2 * prompt_tokens * d * block.mlp.up.shape[1]       # gated FFN
    if cfg.copy_head:  # the state's query, the scores and the gate
      d, slots = llm_cfg.width, events * cfg.category_text_tokens
      total += 2 * prompt_tokens * d * d + 2 * prompt_tokens * slots * d
      total += 2 * prompt_tokens * d
  else:
    total += text_prompt_flops(llm_cfg, prompt_tokens + context)
  return float(total)
