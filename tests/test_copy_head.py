"""`bridge.copy_head`: a pointer head that mixes copies of the token memory's tokens into the
LLM's next-token distribution (`bridge/copy_head.py`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import inference
from user_llm_jax.bridge import category_text
from user_llm_jax.bridge import copy_head
from user_llm_jax.bridge import strategies
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.eval import cost
from user_llm_jax.llm import sampler
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate

from tests import test_category_text
from tests import workdir_fixtures
from tests.test_user_llm import B, E, T, make_batch

L = 3        # name tokens kept (`category_text_tokens`)
START = 11   # the prompt's last token (`copy_start_token`)


def _head_by_hand(logits, hidden, token_embeds, keys, ids, mask, head):
  """The module docstring's formula in numpy."""
  d = hidden.shape[-1]
  unit = token_embeds / np.sqrt(np.mean(token_embeds ** 2, -1, keepdims=True) + 1e-6)
  q = unit + hidden @ np.asarray(head.query_hidden[...]) / d
  scores = np.einsum("btk,bsk->bts", q, keys) / np.sqrt(d) * float(head.match_scale[...])
  scores = np.where(mask[:, None, :], scores, -np.inf)
  full = np.concatenate([np.full(scores.shape[:2] + (1,), float(head.null_logit[...])),
                         scores], -1)
  attn = np.exp(full - full.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  g = 1 / (1 + np.exp(-(hidden @ np.asarray(head.gate_w[...]) / np.sqrt(d)
                        + float(head.copy_gate[...]))))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  lower = np.asarray(head.lowercase[...])
  out = (1 - g * (1 - attn[..., 0]))[..., None] * p
  for b in range(ids.shape[0]):
    for s in range(ids.shape[1]):
      forms = lower == lower[ids[b, s]]      # the slot's token in every casing
      share = p[b][:, forms] / p[b][:, forms].sum(-1, keepdims=True)
      out[b][:, forms] += g[b][:, None] * attn[b, :, s + 1][:, None] * share
  return np.log(out)


def test_the_mixture_by_hand_and_a_distribution():
  rng = np.random.default_rng(0)
  b, t, s, d, v = 2, 3, 4, 8, 10
  head = copy_head.CopyHead(d, v, gate_init=0.3, null_init=1.0)
  head.query_hidden[...] = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)
  head.gate_w[...] = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
  head.match_scale[...] = jnp.asarray(0.7)
  head.set_lowercase(np.array([0, 1, 2, 2, 4, 5, 6, 7, 8, 9]))  # 3 is a cased form of 2
  logits, hidden, embeds = (rng.normal(size=shape).astype(np.float32)
                            for shape in ((b, t, v), (b, t, d), (b, t, d)))
  slots = rng.normal(size=(b, s, d)).astype(np.float32)
  ids = np.array([[3, 3, 5, 0], [9, 1, 2, 2]], np.int32)   # a repeated token sums its slots
  mask = np.array([[True, True, True, False], [True, True, False, True]])
  keys = np.asarray(head.slot_keys(jnp.asarray(slots)))
  np.testing.assert_allclose(keys, np.roll(slots, -(d // 2), axis=-1))
  out = np.asarray(head(jnp.asarray(logits), jnp.asarray(hidden), jnp.asarray(embeds),
                        jnp.asarray(keys), jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(out, _head_by_hand(logits, hidden, embeds, keys, ids, mask, head),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
  # A masked slot copies nothing: token 0 of row 0 keeps the LLM's share, as token 4
  # (in no slot) does.
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  np.testing.assert_allclose(out[0, :, 0] - lp[0, :, 0], out[0, :, 4] - lp[0, :, 4],
                             rtol=1e-5, atol=1e-6)
  # The copies of tokens 2 and 3 (one lowercase class) are split between them as the LLM
  # weighs them, so their ratio is the LLM's.
  np.testing.assert_allclose(out[1, :, 3] - out[1, :, 2], logits[1, :, 3] - logits[1, :, 2],
                             rtol=1e-4)


def test_copy_ready_the_token_just_read_offers_its_successor():
  """At its initial values the head offers, after a token of a memory phrase, the token
  that follows it there, and nothing where the token is in no phrase."""
  d, v = 256, 40   # unit-RMS vectors: a match scores sqrt(D) = 16, the null slot 8
  emb = np.random.default_rng(1).normal(size=(v, d)).astype(np.float32)
  unit = lambda i: emb[i] / np.sqrt(np.mean(emb[i] ** 2))
  phrase = [7, 21, 3]                                # "7 21 3" with a start token before it
  slots = np.stack([unit(tok) + np.roll(unit(prev), d // 2)
                    for prev, tok in zip([START] + phrase[:-1], phrase)])[None]  # [1,3,D]
  head = copy_head.CopyHead(d, v, gate_init=4.0)     # the gate open: 98% copied on a match
  keys = head.slot_keys(jnp.asarray(slots))
  read = [START, 7, 21, 3, 30]                       # 3 ends the phrase, 30 is in none
  embeds = jnp.asarray(emb[read])[None]
  flat = jnp.zeros((1, len(read), v))                # a uniform LLM
  out = np.exp(np.asarray(head(flat, jnp.zeros((1, len(read), d)), embeds, keys,
                               jnp.asarray([phrase]), jnp.ones((1, 3), bool))))[0]
  for t, successor in enumerate(phrase):
    assert out[t].argmax() == successor and out[t, successor] > 0.9, (t, out[t].max())
  for t in (3, 4):   # nothing to copy: the LLM's uniform, under 1% moved by chance matches
    np.testing.assert_allclose(out[t], 1 / v, atol=0.01)


class _Tokenizer:
  """Words as tokens: id i is WORDS[i]."""
  WORDS = ["<pad>", "Came", "came", " On", " on", "TIME", "time", "!", "Ab"]
  vocab_size = len(WORDS)

  def decode(self, ids):
    return "".join(self.WORDS[i] for i in ids)

  def encode(self, text, add_bos=False):
    del add_bos
    return [self.WORDS.index(text)] if text in self.WORDS else [0, 0]


def test_lowercase_table():
  table = copy_head.lowercase_table(_Tokenizer(), 10)
  # "Came" -> "came", " On" -> " on", "TIME" -> "time"; "!" and lowercase stay; "Ab" ->
  # "ab" is no single token: kept; ids beyond the tokenizer map to themselves.
  np.testing.assert_array_equal(table, [0, 2, 2, 4, 4, 6, 6, 7, 8, 9])


def _model(seed=0, **changes):
  cfg = ullm.UserLlmConfig(xattn_every=3, category_text=True, category_text_tokens=L,
                           text_memory=True, copy_head=True, **changes)
  tokens = np.random.default_rng(3).integers(
      -1, LLM_TINY.vocab_size, (ENCODER_TINY.num_categories, L)).astype(np.int32)
  lower = np.arange(LLM_TINY.vocab_size, dtype=np.int32)
  lower[5], lower[6] = 6, 6                       # token 5 reads as token 6
  model = ullm.UserLLM(cfg, encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(seed)),
                       llm=Decoder(LLM_TINY, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1),
                       category_tokens=tokens, lowercase_tokens=lower, copy_start_token=START)
  return model, tokens


def test_the_model_with_the_head_tables_gradients_strategies_and_cost():
  model, tokens = _model()
  plain = ullm.UserLLM(model.cfg.replace(copy_head=False),
                       encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(0)),
                       llm=Decoder(LLM_TINY, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                       category_tokens=tokens)
  np.testing.assert_array_equal(np.asarray(model.bridge.memory_tokens[...]), tokens)
  assert int(model.llm.copy_head.lowercase[...][5]) == 6
  start = category_text.token_vectors(model.llm.embedder.embedding[...],
                                      np.asarray([[START]]))[0, 0]
  np.testing.assert_allclose(np.asarray(model.bridge.memory_start[...]), np.asarray(start),
                             rtol=1e-6)
  # Every other parameter starts as without the head.
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      nnx.state(plain, nnx.All(nnx.Param, nnx.Not(nnx.PathContains(
                          "memory_start")))),
                      nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.Any(
                          nnx.PathContains("memory_start"), nnx.PathContains("copy_head"))))))
  assert all(jax.tree.leaves(same))
  batch = make_batch()
  tokens_in = jnp.asarray(batch["tokens"])
  out = model(batch, tokens_in)
  np.testing.assert_allclose(np.asarray(jnp.exp(out).sum(-1)), 1.0, rtol=1e-5)
  # The copy moves the output (the plain model's gates are closed as the model's are).
  ref = jax.nn.log_softmax(plain(batch, tokens_in), -1)
  assert float(jnp.abs(out - ref).max()) > 1e-3
  loss, metrics = model.loss(batch)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(metrics["gate/copy"]), 1 / (1 + np.exp(2.0)), rtol=1e-6)
  grads = nnx.grad(lambda m: m.loss(batch)[0])(model)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  for name in ("copy_gate", "gate_w", "match_scale", "null_logit"):
    assert float(jnp.abs(grads["llm"]["copy_head"][name][...]).max()) > 0, name
  assert "lowercase" not in grads["llm"]["copy_head"]
  assert "memory_tokens" not in grads["bridge"]
  # Bridge parameters: trained by every strategy, never counted as the LLM's.
  for strategy in strategies.STRATEGIES:
    trained = nnx.state(model, strategies.trainable_filter(strategy))
    assert "copy_head" in trained["llm"], strategy
  assert not nnx.state(model, nnx.All(nnx.Param, strategies.LLM,
                                      nnx.PathContains("copy_head")))
  assert cost.user_llm_flops(model, 20, E) > cost.user_llm_flops(plain, 20, E)


def test_decoding_paths_read_the_memory_as_the_forward_pass_does():
  """Prefill, a decode step and the evaluation conditioner give the forward pass's
  output distribution (the copy head reads its memory through the `CrossContext`)."""
  model, _ = _model()
  model.llm.copy_head.copy_gate[...] = jnp.asarray(1.0)
  for blk in model.llm.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(0.5)
  batch = make_batch()
  tokens = jnp.asarray(batch["tokens"])
  forward = np.asarray(model(batch, tokens))

  @nnx.jit
  def decode(model):
    kw = model.sampler_inputs(batch, tokens[:, :-1])
    prompt_mask = kw.pop("prompt_mask")
    first, state = sampler.prefill(model.llm, kw.pop("tokens"), prompt_mask,
                                   cache_length=T + 2, **kw)
    second, _ = sampler.decode_step(model.llm, tokens[:, -1], state)
    return first, second

  first, second = decode(model)
  np.testing.assert_allclose(np.asarray(first), forward[:, -2], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(second), forward[:, -1], rtol=1e-4, atol=1e-4)
  cond = evaluate.user_llm_conditioner(model, pad_id=0)(
      {**{k: batch[k] for k in evaluate.ENCODER_KEYS if k in batch},
       "last_index": np.zeros((B,), np.int32), "tokens": batch["tokens"],
       "prompt_length": np.full((B,), T, np.int32)})
  assert cond.context.copy is not None and cond.context_mask is None
  scores = evaluate.score_options(cond.row(1), [[int(tokens[1, 0])]], batch_size=1)
  kw = model.sampler_inputs({k: v[1:] for k, v in batch.items()}, tokens[1:])
  logits, _ = sampler.prefill(model.llm, kw.pop("tokens"), kw.pop("prompt_mask"),
                              cache_length=T + 1, **kw)
  expected = jax.nn.log_softmax(logits[0])[int(tokens[1, 0])]
  np.testing.assert_allclose(scores[0, 0], float(expected), rtol=1e-4, atol=1e-4)


def test_an_untrained_model_with_the_gate_open_writes_the_users_phrase():
  """The copy-ready start: a user whose every event carries one summary, a random LLM and
  the copy gate open: greedy decoding after the prompt writes that summary's tokens."""
  model, tokens = _model()
  model.llm.copy_head.copy_gate[...] = jnp.asarray(8.0)
  category = next(c for c in range(2, ENCODER_TINY.num_categories)
                  if (tokens[c] >= 0).all() and len(set(tokens[c])) == L
                  and START not in tokens[c])
  batch = make_batch()
  batch["inputs_category"] = np.where(batch["mask"][..., None], category, 0).astype(np.int32)
  prompt = jnp.asarray(np.concatenate([batch["tokens"][:, :4],
                                       np.full((B, 1), START, np.int32)], 1))
  kw = model.sampler_inputs(batch, prompt)
  out = sampler.Sampler(model.llm, pad_id=0)(
      np.asarray(prompt).tolist(), max_new_tokens=L, context=kw["context"])
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :L], np.tile(tokens[category], (B, 1)))
  # With the gate shut (the copy-off control) the output is the LLM's own, which writes
  # something else; the trained gate comes back afterwards.
  with copy_head.gate_shut(model.llm.copy_head):
    kw = model.sampler_inputs(batch, prompt)
    out = sampler.Sampler(model.llm, pad_id=0)(
        np.asarray(prompt).tolist(), max_new_tokens=L, context=kw["context"])
    llm_alone = model.llm.head(model.hidden_states(batch, prompt))
    np.testing.assert_allclose(np.asarray(model(batch, prompt)),
                               np.asarray(jax.nn.log_softmax(llm_alone, -1)), atol=1e-5)
  assert not (np.asarray(out.tokens)[:, :L] == tokens[category]).all()
  assert float(model.llm.copy_head.copy_gate[...]) == 8.0


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="copy_head=True needs text_memory=True"):
    ullm.UserLlmConfig(category_text=True, copy_head=True)
  model, _ = _model()
  with pytest.raises(ValueError, match=r"holds \(%d, %d\)" % (ENCODER_TINY.num_categories, L)):
    model.bridge.set_memory_tokens(np.zeros((3, L), np.int32))
  with pytest.raises(ValueError, match="lowercase table"):
    model.llm.copy_head.set_lowercase(np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match="copy head: pass its context as a CrossContext"):
    model.llm(jnp.zeros((1, 2), jnp.int32), positions=jnp.zeros((1, 2), jnp.int32),
              context=jnp.zeros((1, 2, LLM_TINY.width)))


def test_a_restored_model_gets_the_tables_from_the_checkpoint(tmp_path):
  model, _ = _model()
  rebuilt = test_category_text.restored_from_checkpoint(model, tmp_path, "text_memory")
  np.testing.assert_array_equal(np.asarray(rebuilt.bridge.memory_tokens[...]),
                                np.asarray(model.bridge.memory_tokens[...]))
  np.testing.assert_array_equal(np.asarray(rebuilt.llm.copy_head.lowercase[...]),
                                np.asarray(model.llm.copy_head.lowercase[...]))


def test_the_job_trains_with_the_head_and_a_copied_workdir_restores_it(tmp_path):
  _, workdir = workdir_fixtures.user_llm_run(
      tmp_path, steps=2, eval__num_examples=2, tasks__names=("favorite_category",),
      bridge__category_text=True, bridge__text_memory=True, bridge__copy_head=True,
      eval__shuffled_control=True)
  summary = json.loads((workdir / "summary.json").read_text())
  # The copy head's control row: the same model with the gate shut, on the same users.
  rows = summary["metrics"]
  assert set(rows["user_llm_copy_off"]) == set(rows["user_llm"]) == {"favorite_category"}
  assert any("user_llm_copy_off" in v for v in summary["verdicts"])
  model, tokenizer, vocab, run = inference.load_trained(str(workdir))
  assert run.config.bridge.copy_head is True
  tokens = category_text.token_table(vocab.categories, tokenizer,
                                     run.config.bridge.category_text_tokens)
  np.testing.assert_array_equal(np.asarray(model.bridge.memory_tokens[...]), tokens)
  np.testing.assert_array_equal(
      np.asarray(model.llm.copy_head.lowercase[...]),
      copy_head.lowercase_table(tokenizer, model.llm.cfg.vocab_size))


def test_gradients_stay_finite_where_the_llm_gives_tokens_no_probability():
  """Logits 80 nats apart underflow most probabilities to 0 in float32; the loss's
  gradient must stay finite (a division by a class's probability, or the log of a zero
  copy, would put inf x 0 = NaN into it)."""
  rng = np.random.default_rng(0)
  b, t, s, d, v = 2, 3, 4, 16, 50
  head = copy_head.CopyHead(d, v)
  lower = np.arange(v)
  lower[3] = lower[7] = 2
  head.set_lowercase(lower)
  logits = jnp.asarray(rng.normal(size=(b, t, v)) * 80, jnp.float32)
  hidden, embeds = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
  keys = head.slot_keys(jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32))
  ids = jnp.asarray([[2, 3, 5, 0], [9, 1, 2, 7]])

  def nll(logits, keys, hidden):
    out = jax.nn.log_softmax(head(logits, hidden, embeds, keys, ids, jnp.ones((b, s), bool)))
    return -(out[..., 2].sum() + out[..., 3].sum() + out[..., 11].sum())

  assert np.isfinite(float(nll(logits, keys, hidden)))
  for grad in jax.grad(nll, argnums=(0, 1, 2))(logits, keys, hidden):
    assert bool(jnp.isfinite(grad).all())
