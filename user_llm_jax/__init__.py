"""User-LLM in JAX/Flax: contextualize a decoder LLM with user embeddings."""

__version__ = "0.1.0"
