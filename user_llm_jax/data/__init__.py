"""Timeline schema, vocabularies and Grain input pipelines."""

from user_llm_jax.data.schema import (
    FIRST_ID,
    OOV_ID,
    PAD_ID,
    VOCAB_FILENAME,
    ItemInfo,
    Vocabulary,
)
