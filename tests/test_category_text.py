"""`bridge.category_text`: each event's category names, as the LLM's own token embeddings,
added to its user embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import inference
from user_llm_jax.bridge import category_text
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.data import schema
from user_llm_jax.data import text_categories
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate
from user_llm_jax.train import checkpointing

from tests import workdir_fixtures
from tests.test_user_llm import B, NUM_VALID, make_batch, scramble_padded_events

NAMES = ["<pad>", "<oov>", "Drama", "Film-Noir", text_categories.PREFIX + "five stars"] + [
    f"genre {i}" for i in range(ENCODER_TINY.num_categories - 5)]


class _Words:
  """A tokenizer whose tokens are words (ids from a fixed table), to check the table."""
  VOCAB = {"Drama": 5, "Film-Noir": 6, "five": 7, "stars": 8, "genre": 9}

  def encode(self, text, add_bos=None):
    assert add_bos is False
    return [self.VOCAB.get(w, 10 + len(w)) for w in text.split()]


def test_token_table_strips_the_summary_prefix_pads_and_leaves_reserved_ids_empty():
  table = category_text.token_table(NAMES, _Words(), max_tokens=1)
  assert table.shape == (len(NAMES), 1) and table.dtype == np.int32
  assert (table[:schema.FIRST_ID] == category_text.PAD_TOKEN).all()
  assert table[2, 0] == 5 and table[4, 0] == 7  # "five stars" cut to its first token
  wide = category_text.token_table(NAMES, _Words(), max_tokens=3)
  np.testing.assert_array_equal(wide[4], [7, 8, category_text.PAD_TOKEN])
  with pytest.raises(ValueError, match="max_tokens >= 1"):
    category_text.token_table(NAMES, _Words(), max_tokens=0)


def test_text_vectors_are_unit_rms_token_means_and_event_text_averages_real_categories():
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=(20, 6)).astype(np.float32)
  tokens = np.array([[-1, -1], [-1, -1], [5, -1], [7, 8]], np.int32)
  table = np.asarray(category_text.text_vectors(jnp.asarray(embedding), tokens))
  assert (table[:2] == 0).all()
  for row, ids in ((2, [5]), (3, [7, 8])):
    mean = embedding[ids].mean(0)
    np.testing.assert_allclose(table[row], mean / np.sqrt(np.mean(mean ** 2)), rtol=1e-5)
  cats = np.array([[[2, 3, 0], [0, 0, 0], [1, 3, 0]]], np.int32)  # [B=1, E=3, C=3]
  out = np.asarray(category_text.event_text(jnp.asarray(table), cats))
  np.testing.assert_allclose(out[0, 0], (table[2] + table[3]) / 2, rtol=1e-6)
  assert (out[0, 1] == 0).all()                       # no real category: nothing added
  np.testing.assert_allclose(out[0, 2], table[3], rtol=1e-6)  # OOV ignored


def _pair(mode="cross_attention", seed=0):
  """(the model with category text, the same model without it), same initial weights."""
  cfg = ullm.UserLlmConfig(mode=mode, xattn_every=3, category_text=True,
                           category_text_tokens=2)
  tokens = np.random.default_rng(3).integers(
      -1, LLM_TINY.vocab_size, (ENCODER_TINY.num_categories, 2)).astype(np.int32)
  build = lambda c, t: ullm.UserLLM(
      c, encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(seed)),
      llm=Decoder(LLM_TINY, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1), category_tokens=t)
  return build(cfg, tokens), build(cfg.replace(category_text=False), None), tokens


@pytest.mark.parametrize("mode", ullm.MODES)
def test_each_event_gets_its_categories_text_and_nothing_else_changes(mode):
  model, plain, tokens = _pair(mode)
  batch = make_batch()
  table = category_text.text_vectors(model.llm.embedder.embedding[...], tokens)
  np.testing.assert_array_equal(np.asarray(model.bridge.category_text[...]), np.asarray(table))
  # Every other parameter starts as without the option.
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      nnx.state(plain, nnx.Param),
                      nnx.state(model, nnx.All(nnx.Param,
                                               nnx.Not(nnx.PathContains("text_gain")))))
  assert all(jax.tree.leaves(same))
  if mode == "cross_attention":
    ctx, mask = model.user_context(batch)
    ref, ref_mask = plain.user_context(batch)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))
    expected = np.asarray(ref) + np.asarray(
        category_text.event_text(table, batch["inputs_category"]))
    np.testing.assert_allclose(np.asarray(ctx), expected, rtol=1e-5, atol=1e-6)
    # The gain scales it (a trained parameter, logical axis 'embed').
    assert model.bridge.text_gain.get_metadata().get("out_sharding") == ("embed",)
    model.bridge.text_gain[...] = jnp.zeros_like(model.bridge.text_gain[...])
    np.testing.assert_allclose(np.asarray(model.user_context(batch)[0]), np.asarray(ref),
                               rtol=1e-6, atol=1e-7)
  else:
    ctx, _ = model.user_context(batch)
    assert not np.allclose(np.asarray(ctx), np.asarray(plain.user_context(batch)[0]))
  # The evaluation path (encoder + bridge apart from the LLM) reads the categories too.
  graphdef, state = nnx.split((model.encoder, model.bridge))
  keys = {k: batch[k] for k in evaluate.ENCODER_KEYS if k in batch}
  ev, _ = evaluate._user_context(graphdef, state, keys, model.bridge_target_rms())  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(ev), np.asarray(model.user_context(batch)[0]),
                             rtol=1e-5, atol=1e-6)
  logits = model(batch, jnp.asarray(batch["tokens"]))
  assert bool(jnp.isfinite(logits).all())


def test_padded_events_add_no_text_and_the_gain_trains():
  model, _, _ = _pair()
  batch = make_batch()
  ctx, _ = model.user_context(batch)
  scrambled, _ = model.user_context(scramble_padded_events(batch))
  for row in range(B):
    np.testing.assert_allclose(np.asarray(scrambled[row, :NUM_VALID[row]]),
                               np.asarray(ctx[row, :NUM_VALID[row]]), rtol=1e-5, atol=1e-6)

  for blk in model.llm.cross_attention.values():  # open the gates: the context is read
    blk.attn_gate[...] = jnp.asarray(0.5)
  grads = nnx.grad(lambda m: m.loss(batch)[0])(model)
  assert float(jnp.abs(grads["bridge"]["text_gain"][...]).max()) > 0
  # The table is a constant, not a parameter: no strategy trains it.
  assert "category_text" not in grads["bridge"]
  assert not nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("category_text")))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="category_text=True needs use_perceiver=False"):
    ullm.UserLlmConfig(category_text=True, use_perceiver=True)
  with pytest.raises(ValueError, match="category_text_tokens"):
    ullm.UserLlmConfig(category_text=True, category_text_tokens=0)
  model, _, _ = _pair()
  batch = make_batch()
  with pytest.raises(ValueError, match="inputs_category"):
    model.bridge(model.encoder(batch), jnp.asarray(batch["mask"]))
  with pytest.raises(ValueError, match=r"holds \(%d, %d\)" % (ENCODER_TINY.num_categories,
                                                              LLM_TINY.width)):
    model.bridge.set_category_text(jnp.zeros((3, LLM_TINY.width)))


def test_a_restored_model_gets_the_table_from_the_checkpoint(tmp_path):
  """A model rebuilt from its architecture (generate mode) has no category names; its text
  table comes back with the weights."""
  model, _, _ = _pair()
  rebuilt = restored_from_checkpoint(model, tmp_path, "category_text")
  np.testing.assert_array_equal(np.asarray(rebuilt.bridge.category_text[...]),
                                np.asarray(model.bridge.category_text[...]))


def restored_from_checkpoint(model: ullm.UserLLM, tmp_path, table: str) -> ullm.UserLLM:
  """`model` saved, then rebuilt without category names (its fixed bridge `table` all 0)
  and restored: asserts the rebuilt model's user context equals the saved one's."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), every=1)
  ckpt.save(1, nnx.state(model, nnx.Not(nnx.RngState)))
  ckpt.close()
  rebuilt = ullm.UserLLM(model.cfg, encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(5)),
                         llm=Decoder(LLM_TINY, rngs=nnx.Rngs(5)), rngs=nnx.Rngs(6))
  assert float(jnp.abs(getattr(rebuilt.bridge, table)[...]).max()) == 0
  checkpointing.restore_params(rebuilt, str(tmp_path))
  batch = make_batch()
  np.testing.assert_allclose(np.asarray(rebuilt.user_context(batch)[0]),
                             np.asarray(model.user_context(batch)[0]), rtol=1e-6)
  return rebuilt


def test_the_job_trains_with_category_text_and_a_copied_workdir_restores_its_table(tmp_path):
  """End to end on the tiny smoke job: the run trains and evaluates with the option, and
  `--mode=generate`'s loader (a model rebuilt from run.json, no category names given)
  gets back the table the job computed from the vocabulary and the LLM's embeddings."""
  _, workdir = workdir_fixtures.user_llm_run(tmp_path, steps=2, eval__num_examples=2,
                                             tasks__names=("favorite_category",),
                                             bridge__category_text=True)
  model, tokenizer, vocab, run = inference.load_trained(str(workdir))
  assert run.config.bridge.category_text is True
  tokens = category_text.token_table(vocab.categories, tokenizer,
                                     run.config.bridge.category_text_tokens)
  expected = category_text.text_vectors(model.llm.embedder.embedding[...], tokens)
  table = np.asarray(model.bridge.category_text[...])
  assert float(np.abs(table).max()) > 0
  np.testing.assert_allclose(table, np.asarray(expected), rtol=1e-6, atol=1e-7)
