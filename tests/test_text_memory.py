"""`bridge.text_memory`: each event's first category name, token by token, as cross-attention
memory slots (`category_text.memory_slots`)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import inference
from user_llm_jax.bridge import category_text
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.eval import cost
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner

from tests import test_category_text
from tests import test_shuffled_control as shuffled_control
from tests import workdir_fixtures
from tests.test_user_llm import B, E, make_batch

L = 3  # name tokens kept (`category_text_tokens`)


def test_memory_slots_by_hand():
  d = 4
  table = np.zeros((5, 2, d), np.float32)  # 5 categories, 2 name tokens
  table[2] = [[1, 0, 0, 0], [0, 1, 0, 0]]  # a two-token name
  table[3, 0] = [0, 0, 1, 0]                # a one-token name (its second slot is PAD)
  categories = np.array([[[2, 3], [3, 0], [schema.OOV_ID, 2]]], np.int32)  # [1, 3, 2]
  events = np.array([[[2, 0, 0, 0], [0, 0, 0, 4], [1, 1, 1, 1]]], np.float32)
  start = np.array([0, 0, 0, 5], np.float32)
  slots, mask = category_text.memory_slots(
      jnp.asarray(table), jnp.asarray(categories), jnp.asarray(events),
      jnp.asarray([[True, True, False]]), jnp.asarray(start), jnp.asarray(0.5))
  assert slots.shape == (1, 6, d) and mask.shape == (1, 6)
  # Only the first category counts; PAD name slots, OOV and padded events are masked.
  np.testing.assert_array_equal(np.asarray(mask), [[True, True, True, False, False, False]])
  unit = lambda v: v / np.sqrt(np.mean(np.square(v)))
  roll = lambda v: np.roll(v, d // 2)
  s = np.asarray(slots)
  np.testing.assert_allclose(s[0, 0], table[2, 0] + roll(start) + 0.5 * unit(events[0, 0]),
                             rtol=1e-5)
  np.testing.assert_allclose(s[0, 1], table[2, 1] + roll(table[2, 0])
                             + 0.5 * unit(events[0, 0]), rtol=1e-5)
  np.testing.assert_allclose(s[0, 2], table[3, 0] + roll(start) + 0.5 * unit(events[0, 1]),
                             rtol=1e-5)


def test_token_vectors_are_unit_rms_embeddings_and_pad_is_zero():
  embedding = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32) * 3
  tokens = np.array([[4, 7, category_text.PAD_TOKEN],
                     [category_text.PAD_TOKEN] * 3], np.int32)
  out = np.asarray(category_text.token_vectors(jnp.asarray(embedding), tokens))
  assert out.shape == (2, 3, 6)
  np.testing.assert_allclose(out[0, 1], embedding[7] / np.sqrt(np.mean(embedding[7] ** 2)),
                             rtol=1e-5)
  assert (out[0, 2] == 0).all() and (out[1] == 0).all()


def _pair(seed=0):
  """(the model with the memory, the same model without it), same initial weights."""
  cfg = ullm.UserLlmConfig(xattn_every=3, category_text=True, category_text_tokens=L,
                           text_memory=True)
  tokens = np.random.default_rng(3).integers(
      -1, LLM_TINY.vocab_size, (ENCODER_TINY.num_categories, L)).astype(np.int32)
  build = lambda c: ullm.UserLLM(
      c, encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(seed)),
      llm=Decoder(LLM_TINY, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1),
      category_tokens=tokens)
  return build(cfg), build(cfg.replace(text_memory=False)), tokens


def test_the_memory_follows_the_event_embeddings_and_nothing_else_changes():
  model, plain, tokens = _pair()
  batch = make_batch()
  table = category_text.token_vectors(model.llm.embedder.embedding[...], tokens)
  np.testing.assert_array_equal(np.asarray(model.bridge.text_memory[...]), np.asarray(table))
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      nnx.state(plain, nnx.Param),
                      nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.Any(
                          nnx.PathContains("memory_start"),
                          nnx.PathContains("memory_event_gain"))))))
  assert all(jax.tree.leaves(same))
  ctx, mask = model.user_context(batch)
  ref, ref_mask = plain.user_context(batch)
  assert ctx.shape == (B, E + E * L, LLM_TINY.width)
  np.testing.assert_allclose(np.asarray(ctx[:, :E]), np.asarray(ref), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask[:, :E]), np.asarray(ref_mask))
  slots, slot_mask = category_text.memory_slots(
      table, batch["inputs_category"], ref, ref_mask, model.bridge.memory_start[...],
      model.bridge.memory_event_gain[...])
  np.testing.assert_allclose(np.asarray(ctx[:, E:]), np.asarray(slots), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask[:, E:]), np.asarray(slot_mask))
  # The evaluation path (encoder + bridge apart from the LLM) builds the same memory.
  graphdef, state = nnx.split((model.encoder, model.bridge))
  keys = {k: batch[k] for k in evaluate.ENCODER_KEYS if k in batch}
  ev, ev_mask = evaluate._user_context(graphdef, state, keys, None)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(ev), np.asarray(ctx), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ev_mask), np.asarray(mask))
  # With the gates open the memory changes the logits; the start and the gain train.
  for blk in model.llm.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(0.5)
  grads = nnx.grad(lambda m: m.loss(batch)[0])(model)
  assert float(jnp.abs(grads["bridge"]["memory_start"][...]).max()) > 0
  assert float(jnp.abs(grads["bridge"]["memory_event_gain"][...])) > 0
  assert "text_memory" not in grads["bridge"]
  assert not nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("text_memory")))
  # The per-answer cost counts the slots.
  assert cost.user_llm_flops(model, 20, E) > cost.user_llm_flops(plain, 20, E)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="text_memory=True needs category_text=True"):
    ullm.UserLlmConfig(text_memory=True)
  with pytest.raises(ValueError, match="mode='soft_prompt'"):
    ullm.UserLlmConfig(mode="soft_prompt", category_text=True, text_memory=True)
  model, _, _ = _pair()
  with pytest.raises(ValueError, match=r"holds \(%d, %d, %d\)" % (
      ENCODER_TINY.num_categories, L, LLM_TINY.width)):
    model.bridge.set_text_memory(jnp.zeros((3, L, LLM_TINY.width)))


def test_a_restored_model_gets_the_memory_from_the_checkpoint(tmp_path):
  model, _, _ = _pair()
  rebuilt = test_category_text.restored_from_checkpoint(model, tmp_path, "text_memory")
  np.testing.assert_array_equal(np.asarray(rebuilt.bridge.text_memory[...]),
                                np.asarray(model.bridge.text_memory[...]))


def test_the_job_trains_with_the_memory_and_a_copied_workdir_restores_it(tmp_path):
  _, workdir = workdir_fixtures.user_llm_run(
      tmp_path, steps=2, eval__num_examples=2, tasks__names=("favorite_category",),
      bridge__category_text=True, bridge__text_memory=True)
  model, tokenizer, vocab, run = inference.load_trained(str(workdir))
  assert run.config.bridge.text_memory is True
  tokens = category_text.token_table(vocab.categories, tokenizer,
                                     run.config.bridge.category_text_tokens)
  expected = category_text.token_vectors(model.llm.embedder.embedding[...], tokens)
  table = np.asarray(model.bridge.text_memory[...])
  assert float(np.abs(table).max()) > 0
  np.testing.assert_allclose(table, np.asarray(expected), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------- copying a name never trained on
#
# Every category name is a permutation of the same five letters, so the mean of a name's
# token embeddings (`category_text` alone) is one vector for all of them; the test users'
# names never occur in training. Only reading the tokens in order lets the model write
# them: with the memory it does, without it it cannot.

COPY_NAMES = tuple("".join(p) for p in np.random.default_rng(0).permutation(
    list(itertools.permutations("abcde")))[:40])
TRAIN_NAMES, NUM_COPY_TEST = 32, 48


def _copy_accuracy(text_memory: bool) -> tuple[float, float]:
  """(favorite-genre accuracy on users of unseen names, on training users)."""
  rng = np.random.default_rng(1)
  record = shuffled_control.user_record
  data = prepared.Splits(
      path="<memory>", vocab=shuffled_control.vocabulary(COPY_NAMES), stats={},
      train=[record(rng, f"train{i}", range(TRAIN_NAMES)) for i in range(256)],
      test=[record(rng, f"test{i}", range(TRAIN_NAMES, len(COPY_NAMES)))
            for i in range(NUM_COPY_TEST)], validation=None)
  model, tokenizer, transform = shuffled_control.train_tiny(
      data, ullm.UserLlmConfig(xattn_every=1, category_text=True, text_memory=text_memory),
      steps=200)
  condition = evaluate.user_llm_conditioner(model, tokenizer.pad_id)
  config = shuffled_control.config()
  unseen = runner.evaluate_tasks(condition, data, transform, config)
  seen = runner.evaluate_tasks(condition, dataclasses.replace(
      data, test=data.train[:NUM_COPY_TEST]), transform, config)
  return (unseen[prompts.FAVORITE_CATEGORY]["accuracy"],
          seen[prompts.FAVORITE_CATEGORY]["accuracy"])


def test_the_memory_lets_the_model_copy_a_name_it_never_trained_on():
  unseen, seen = _copy_accuracy(text_memory=True)
  assert unseen >= 0.9 and seen >= 0.9, (unseen, seen)
  unseen, seen = _copy_accuracy(text_memory=False)
  assert seen >= 0.9, seen      # it learned the training users' names ...
  assert unseen <= 0.2, unseen  # ... and cannot order letters it only gets as a bag
