"""Logit parity of the tiny configs with transformers' LlamaForCausalLM (PyTorch, float32)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None
        or importlib.util.find_spec("transformers") is None,
        reason="PyTorch and transformers not installed (pip install torch==2.13.0 transformers)"),
]


@pytest.mark.parametrize("name", ["tiny", "tiny_llama3"])
def test_tiny_parity(name, tmp_path):
  from experiments import hf_parity  # pylint: disable=g-import-not-at-top
  model, tokens = hf_parity.build(name, length=32)
  result = hf_parity.compare(model, tokens, tmp_path)
  assert result["argmax_agreement"] == 1.0
  assert result["max_abs_diff"] < hf_parity.TOLERANCE, result
