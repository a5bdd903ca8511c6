"""Bridges between the user encoder and the LLM, the combined User-LLM, training strategies."""

from user_llm_jax.bridge.cross_attention import GatedCrossAttention, insert_cross_attention
from user_llm_jax.bridge.perceiver import PerceiverResampler
from user_llm_jax.bridge.projection import Projection
from user_llm_jax.bridge.soft_prompt import answer_loss_mask, merge_soft_prompt
from user_llm_jax.bridge.strategies import (STRATEGIES, check_strategy, trainable_and_total,
                                            param_groups, trainable_filter)
from user_llm_jax.bridge.user_llm import (MODES, Bridge, UserLLM, UserLlmConfig,
                                          build_user_llm)
