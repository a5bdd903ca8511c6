"""The shuffled-context control tells a model that reads its user context from one that does
not: on a synthetic task whose answer is only in the user's events, a tiny User-LLM trained
on it answers almost every user right, and about as often as two random users agree once
each user's context is swapped for the next one's (`runner.shuffled_examples`).

Each user's history is made of items of one genre, so the favorite genre (the label) is
only in the encoder's input: the prompt is the same fixed question for every user.
"""

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.bridge import category_text
from user_llm_jax.bridge import strategies
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import trainer as trainer_lib

pytestmark = pytest.mark.slow

GENRES = ("Action", "Comedy", "Drama", "Horror")  # first letters differ
ITEMS_PER_GENRE = 6
WINDOW = 8
NUM_TEST = 64


def vocabulary(genres: tuple[str, ...] = GENRES) -> schema.Vocabulary:
  items = [schema.ItemInfo("<pad>", "<pad:item>"), schema.ItemInfo("<oov>", "<oov:item>")]
  for g, _ in enumerate(genres):
    items += [schema.ItemInfo(f"{g}-{i}", f"Film {g}{i}", (schema.FIRST_ID + g,))
              for i in range(ITEMS_PER_GENRE)]
  return schema.Vocabulary(dataset="movielens", items=tuple(items), ratings=(0.0, 0.0, 3.0),
                           categories=("<pad>", "<oov>", *genres))


def user_record(rng: np.random.Generator, name: str,
                genres: Sequence[int] = range(len(GENRES))) -> dict:
  """A user whose whole history is of one genre drawn from `genres` (its label)."""
  genre = int(rng.choice(genres))
  n = int(rng.integers(4, WINDOW + 2))
  items = schema.FIRST_ID + genre * ITEMS_PER_GENRE + rng.integers(ITEMS_PER_GENRE, size=n)
  return {schema.USER_ID: name.encode(), schema.ITEM_IDS: items.astype(np.int32),
          schema.RATINGS: np.full((n,), 2, np.int32),
          schema.TIMESTAMPS: np.arange(n, dtype=np.int64) * 3600,
          schema.CATEGORY_IDS: np.full((n,), schema.FIRST_ID + genre, np.int32),
          schema.CATEGORY_LENGTHS: np.ones((n,), np.int32),
          schema.FAVORITE_CATEGORY: np.int32(schema.FIRST_ID + genre)}


def config() -> ml_collections.ConfigDict:
  """The keys of a User-LLM config that training batches and evaluation read."""
  return ml_collections.ConfigDict({
      "seed": 0, "data": {"worker_count": 0}, "tasks": {},
      "eval": {"num_examples": 0, "batch_size": 16, "ks": (1,), "exact_threshold": 100}})


def train_tiny(data: prepared.Splits, bridge: ullm.UserLlmConfig, steps: int = 150,
               ) -> tuple[ullm.UserLLM, Any, ex_lib.TaskExample]:
  """(model, tokenizer, transform): a tiny User-LLM (2-layer LLM, byte-level tokens)
  trained `steps` steps on the favorite-genre task of `data` (Full strategy)."""
  vocab = data.vocab
  tokenizer = prompts.byte_level_tokenizer()
  transform = ex_lib.TaskExample(vocab, tokenizer, ex_lib.ExampleConfig(
      tasks=(prompts.FAVORITE_CATEGORY,), window=WINDOW, max_categories=1,
      max_prompt_tokens=160, max_answer_tokens=8))
  encoder_cfg = ENCODER_TINY.replace(num_items=vocab.num_items, num_categories=vocab.num_categories,
                                     num_ratings=vocab.num_ratings, max_len=WINDOW,
                                     max_categories=1, num_layers=1)
  llm_cfg = LLM_TINY.replace(vocab_size=tokenizer.vocab_size, num_layers=2)
  tokens = (category_text.token_table(vocab.categories, tokenizer, bridge.category_text_tokens)
            if bridge.category_text else None)
  with nnx.use_eager_sharding(False):
    model = ullm.UserLLM(bridge, encoder=UserEncoder(encoder_cfg, rngs=nnx.Rngs(1)),
                         llm=Decoder(llm_cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(2),
                         category_tokens=tokens)
  cfg = trainer_lib.TrainConfig(batch_size=16, num_steps=steps, learning_rate=3e-3, warmup=10,
                                weight_decay=0.0, log_every=50, checkpoint_every=1000,
                                eval_every=0, lr_mults=(("_gate$", 10.0),))
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  result = trainer_lib.train(
      model, lambda m, b: m.loss(b, deterministic=False), cfg,
      runner.train_iterator(data, transform, config(), cfg.batch_size), mesh=mesh,
      wrt=strategies.trainable_filter("full"))
  return result.model, tokenizer, transform


@pytest.fixture(scope="module")
def trained():
  """(model, tokenizer, task data, transform) after training on the context-only task."""
  rng = np.random.default_rng(0)
  data = prepared.Splits(
      path="<memory>", train=[user_record(rng, f"train{i}") for i in range(256)],
      test=[user_record(rng, f"test{i}") for i in range(NUM_TEST)], validation=None,
      vocab=vocabulary(), stats={})
  model, tokenizer, transform = train_tiny(
      data, ullm.UserLlmConfig(mode="cross_attention", xattn_every=1))
  return model, tokenizer, data, transform


def test_the_control_drops_a_context_reading_model_to_chance(trained):
  model, tokenizer, data, transform = trained
  condition = eval_lib.user_llm_conditioner(model, tokenizer.pad_id)
  right = runner.evaluate_tasks(condition, data, transform, config())
  swapped = runner.evaluate_tasks(condition, data, transform, config(), shuffle_users=True)
  right = right[prompts.FAVORITE_CATEGORY]
  swapped = swapped[prompts.FAVORITE_CATEGORY]
  assert right["num_examples"] == swapped["num_examples"] == NUM_TEST
  # The prompt says nothing about the user: only the context can give the genre.
  assert right["accuracy"] >= 0.9, right
  # With the next user's context the model answers the next user's genre: it is right
  # exactly as often as two neighbouring test users share a genre (chance ~ 1/4).
  labels = [int(r[schema.FAVORITE_CATEGORY]) for r in data.test]
  agreement = np.mean([labels[i] == labels[(i + 1) % NUM_TEST] for i in range(NUM_TEST)])
  assert swapped["accuracy"] <= 0.45
  assert abs(swapped["accuracy"] - agreement) <= 0.1, (swapped["accuracy"], agreement)


def test_shuffled_examples_swap_only_the_user():
  rng = np.random.default_rng(1)
  vocab = vocabulary()
  transform = ex_lib.TaskExample(vocab, prompts.byte_level_tokenizer(), ex_lib.ExampleConfig(
      tasks=(prompts.FAVORITE_CATEGORY,), window=WINDOW, max_categories=1,
      max_prompt_tokens=160, max_answer_tokens=8))
  examples = [transform.map(dict(user_record(rng, f"u{i}"), task=prompts.FAVORITE_CATEGORY))
              for i in range(3)]
  swapped = runner.shuffled_examples(examples)
  for i, ex in enumerate(swapped):
    nxt = examples[(i + 1) % 3]
    for key in eval_lib.ENCODER_KEYS:
      if key in ex:
        np.testing.assert_array_equal(ex[key], nxt[key])
    for key in (ex_lib.TOKENS, ex_lib.LABEL, ex_lib.LOSS_MASK):
      np.testing.assert_array_equal(ex[key], examples[i][key])
