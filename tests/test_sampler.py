"""Tests for the KV-cache sampler on the tiny decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm import trie as trie_lib
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

PROMPTS = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 31, 7, 64, 2]]
M = 8


class _ShiftBlock(nnx.Module):
  """A cross-attention stand-in: adds the masked mean of the context to every token."""

  def __call__(self, x, context, context_mask):
    w = context_mask[..., None].astype(x.dtype)
    return x + (context * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1)


@pytest.fixture(scope="module")
def model():
  return Decoder(LLM_TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sampler(model):
  return sampler_lib.Sampler(model, pad_id=0, length_bucket=8)


def _make_reference(model):
  """Uncached greedy decoding: the full sequence through the model at every step."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, tokens, context, context_mask):
    m = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = m(tokens, positions=positions, context=context, context_mask=context_mask)
    return jax.nn.log_softmax(logits, -1)

  def run(prompts, steps, context=None, context_mask=None):
    # Right-padded buffer of fixed width: causal attention ignores the padding to the right.
    width = max(map(len, prompts)) + steps
    buf = np.zeros((len(prompts), width), np.int32)
    lens = np.asarray([len(p) for p in prompts])
    for i, p in enumerate(prompts):
      buf[i, :len(p)] = p
    out, logps = [], []
    for _ in range(steps):
      logp = np.asarray(forward(params, jnp.asarray(buf), context, context_mask))
      last = logp[np.arange(len(prompts)), lens - 1]  # [B, V]
      tok = last.argmax(-1)
      out.append(tok)
      logps.append(last[np.arange(len(prompts)), tok])
      buf[np.arange(len(prompts)), lens] = tok
      lens = lens + 1
    return np.stack(out, 1), np.stack(logps, 1)

  return run


@pytest.fixture(scope="module")
def reference(model):
  return _make_reference(model)


def test_cached_greedy_equals_uncached_argmax(sampler, reference):
  out = sampler(PROMPTS, max_new_tokens=M, return_logprobs=True)
  want, want_logp = reference(PROMPTS, M)
  np.testing.assert_array_equal(out.tokens, want)
  np.testing.assert_array_equal(out.lengths, [M] * 3)
  assert not out.stopped.any()
  np.testing.assert_allclose(out.log_probs, want_logp, atol=1e-5)


def test_prompt_order_and_padding_do_not_change_rows(sampler):
  full = sampler(PROMPTS, max_new_tokens=M)
  alone = sampler([PROMPTS[0]], max_new_tokens=M)
  np.testing.assert_array_equal(alone.tokens[0], full.tokens[0])
  swapped = sampler(PROMPTS[::-1], max_new_tokens=M)
  np.testing.assert_array_equal(swapped.tokens[::-1], full.tokens)


def test_per_row_stop_tokens(sampler):
  free = sampler(PROMPTS, max_new_tokens=M)
  # Stop row 0 at the token it emits at step 2, row 1 at step 5; row 2 never stops.
  stops = [[int(free.tokens[0, 2])], [int(free.tokens[1, 5])], [255, 254]]
  stops[2] = [t for t in stops[2] if t not in free.tokens[2]]
  out = sampler(PROMPTS, max_new_tokens=M, stop_tokens=stops)
  first0 = list(free.tokens[0]).index(stops[0][0])
  first1 = list(free.tokens[1]).index(stops[1][0])
  np.testing.assert_array_equal(out.lengths, [first0, first1, M])
  np.testing.assert_array_equal(out.stopped, [True, True, False])
  np.testing.assert_array_equal(out.tokens[0, :first0 + 1], free.tokens[0, :first0 + 1])
  assert np.all(out.tokens[0, first0 + 1:] == 0)
  assert np.all(out.tokens[1, first1 + 1:] == 0)
  np.testing.assert_array_equal(out.tokens[2], free.tokens[2])


def test_seeded_sampling_is_deterministic(sampler):
  a = sampler(PROMPTS, max_new_tokens=M, temperature=1.5, seed=3)
  b = sampler(PROMPTS, max_new_tokens=M, temperature=1.5, seed=3)
  c = sampler(PROMPTS, max_new_tokens=M, temperature=1.5, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(sampler):
  greedy = sampler(PROMPTS, max_new_tokens=M)
  k1 = sampler(PROMPTS, max_new_tokens=M, temperature=1.0, top_k=1, seed=1)
  p0 = sampler(PROMPTS, max_new_tokens=M, temperature=1.0, top_p=1e-6, seed=1)
  np.testing.assert_array_equal(k1.tokens, greedy.tokens)
  np.testing.assert_array_equal(p0.tokens, greedy.tokens)


def test_sample_logits_truncation_sets():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  topk = np.asarray(sampler_lib.sample_logits(logits, keys, temperature=1.0, top_k=2))
  assert set(topk) == {0, 1}
  topp = np.asarray(sampler_lib.sample_logits(logits, keys, temperature=1.0, top_p=0.85))
  assert set(topp) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
  free = np.asarray(sampler_lib.sample_logits(logits, keys, temperature=1.0))
  np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, [.5, .3, .15, .05],
                             atol=0.03)


def test_trie_constraint_and_prefix_function_agree(sampler):
  titles = [[10, 11, 12], [10, 13], [40], [41, 42, 43, 44]]
  end = 250
  trie = trie_lib.TokenTrie(titles, LLM_TINY.vocab_size, end_token=end)
  out = sampler(PROMPTS, max_new_tokens=6, stop_tokens=[end], constraint=trie.to_arrays())
  stored = {tuple(s) for s in trie.sequences()}
  for row in range(3):
    seq = tuple(out.tokens[row, :out.lengths[row] + 1])
    assert out.stopped[row] and seq in stored, seq
  fn = sampler_lib.PrefixFnConstraint(trie.allowed_next_tokens, LLM_TINY.vocab_size, 6)
  out_fn = sampler(PROMPTS, max_new_tokens=6, stop_tokens=[end], constraint=fn)
  np.testing.assert_array_equal(out_fn.tokens, out.tokens)


def test_inputs_embeds_passthrough_matches_tokens(model, sampler):
  tokens, mask = sampler_lib.left_pad(PROMPTS, 0, bucket=8)
  embeds = model.embed(jnp.asarray(tokens))
  a = sampler(inputs_embeds=embeds, prompt_mask=mask, max_new_tokens=M)
  b = sampler(PROMPTS, max_new_tokens=M)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_context_passthrough_reaches_decode_steps():
  model = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  model.cross_attention["2"] = _ShiftBlock()
  ctx = jax.random.normal(jax.random.key(7), (3, 4, LLM_TINY.width))
  ctx_mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  s = sampler_lib.Sampler(model, length_bucket=8)
  out = s(PROMPTS, max_new_tokens=M, context=ctx, context_mask=ctx_mask)
  plain = s(PROMPTS, max_new_tokens=M)
  assert not np.array_equal(out.tokens, plain.tokens)

  # Reference with the same context on the uncached path of the same model.
  want, _ = _make_reference(model)(PROMPTS, M, ctx, ctx_mask)
  np.testing.assert_array_equal(out.tokens, want)


def test_bad_inputs(sampler):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler([[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampler([[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    sampler([[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="2 rows for a batch of 3"):
    sampler(PROMPTS, max_new_tokens=2, stop_tokens=[[1], [2]])


def test_throughput_benchmark_runs_ours_alone(model):
  from experiments.benchmarks import llm_throughput as bench  # pylint: disable=g-import-not-at-top
  res = bench.run_benchmark(model, None, "tiny", [2], prompt_len=16, decode_tokens=4,
                            repeats=1, with_hf=False)
  (row,) = res["rows"]
  assert row["batch"] == 2 and row["ours_prefill_tok_s"] > 0 and row["ours_decode_tok_s"] > 0
  assert "hf_prefill_tok_s" not in row and "disabled" in res["hf_note"]
  assert "prefill tok/s ours" in bench.format_table(res)


@pytest.mark.torch
def test_greedy_tokens_match_hf_transformers(model):
  """Same weights exported to safetensors: HF's cached greedy decode gives our tokens."""
  pytest.importorskip("torch", reason="PyTorch not installed (pip install torch==2.13.0)")
  pytest.importorskip("transformers", reason="transformers not installed")
  from experiments.benchmarks import llm_throughput as bench  # pylint: disable=g-import-not-at-top
  res = bench.run_benchmark(model, None, "tiny", [2], prompt_len=16, decode_tokens=6,
                            repeats=1, with_hf=True)
  assert res["hf_note"] is None
  assert res["rows"][0]["greedy_token_agreement"] == 1.0
