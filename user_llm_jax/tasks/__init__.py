"""User-LLM tasks: fixed prompts, tokenized task examples, and their metrics."""

from user_llm_jax.tasks.evaluate import (
    Catalogue,
    evaluate_category,
    evaluate_next_item,
    evaluate_review,
    recall_from_lists,
    rouge_lsum,
    text_conditioner,
    user_llm_conditioner,
)
from user_llm_jax.tasks.examples import ExampleConfig, TaskExample, TaskSource, collate
from user_llm_jax.tasks.prompts import (
    FAVORITE_CATEGORY,
    NEXT_ITEM,
    REVIEW,
    TASKS,
    PromptSpec,
    byte_level_tokenizer,
    prompt_tokens,
    render_event,
    render_history,
)
