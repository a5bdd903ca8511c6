"""Efficiency benchmark on a tiny random LLM: JSON contract, FLOPs trends, text capping."""

import json

import numpy as np
import pytest

from experiments.benchmarks import efficiency

LENGTHS = (4, 12)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("eff") / "efficiency.json"
  cfg = efficiency.BenchConfig(
      history_lengths=LENGTHS, llm="random", llm_preset="tiny", encoder_preset="tiny",
      variants=("xattn", "xattn_perceiver", "soft_prompt_perceiver", "text_prompt"),
      decode_steps=2, repeats=1, max_text_tokens=4096, uncapped_flops=False)
  efficiency.run_benchmark(cfg, str(out))
  with open(out, encoding="utf-8") as f:
    return json.load(f), out


def test_json_has_flops_latency_and_ratios_per_length(report):
  data, out = report
  assert data["history_lengths"] == list(LENGTHS)
  assert data["complete"] is True  # partial reports (written as it goes) say False
  assert "RANDOM" in data["meta"]["llm"]
  for e in LENGTHS:
    entry = data["results"][str(e)]
    for variant, m in entry["variants"].items():
      assert m["flops"] > 0 and m["latency_s"] > 0, (e, variant)
      parts = m["flops_breakdown"]
      assert m["flops"] == pytest.approx(parts["encoder_bridge"] + parts["prefill"]
                                         + parts["decode"])
    text, ref = entry["variants"]["text_prompt"], entry["variants"][efficiency.REFERENCE]
    assert entry["flops_ratio"] == pytest.approx(text["flops"] / ref["flops"])
    assert entry["latency_ratio"] == pytest.approx(text["latency_s"] / ref["latency_s"])
    assert set(entry["ratios"]) == {"xattn", "xattn_perceiver", "soft_prompt_perceiver"}
    assert text["tokens_per_event"] > 1 and not text["capped"]
    # Cross-attention decode steps reuse the context keys/values cached at prefill.
    for v in ("xattn", "xattn_perceiver"):
      m = entry["variants"][v]
      steps = data["meta"]["decode_steps"]
      assert m["decode_step_flops"] * steps == pytest.approx(m["flops_breakdown"]["decode"])
      assert m["decode_step_flops_reprojecting_context"] > m["decode_step_flops"]
  assert out.with_suffix(".md").read_text().count("\n") >= 4
  assert out.with_suffix(".png").stat().st_size > 1000


def test_text_flops_grow_while_perceiver_llm_part_is_constant(report):
  data, _ = report
  short, long = (data["results"][str(e)]["variants"] for e in LENGTHS)
  assert long["text_prompt"]["flops"] > 2 * short["text_prompt"]["flops"]
  assert long["text_prompt"]["prompt_tokens"] > short["text_prompt"]["prompt_tokens"]
  # Perceiver: Q latents whatever E, so the LLM's prefill + decode cost is identical...
  for v in ("xattn_perceiver", "soft_prompt_perceiver"):
    assert long[v]["flops_breakdown"]["llm"] == short[v]["flops_breakdown"]["llm"]
    assert long[v]["user_embeddings"] == short[v]["user_embeddings"] == 16
    # ...and only the encoder's share grows.
    assert long[v]["flops_breakdown"]["encoder_bridge"] > short[v]["flops_breakdown"][
        "encoder_bridge"]
  # Without the Perceiver the cross-attention reads E embeddings: the LLM part grows.
  assert long["xattn"]["flops_breakdown"]["llm"] > short["xattn"]["flops_breakdown"]["llm"]
  assert short["xattn"]["user_embeddings"] == LENGTHS[0]
  # The ratio grows with the history length.
  assert (data["results"][str(LENGTHS[1])]["flops_ratio"]
          > data["results"][str(LENGTHS[0])]["flops_ratio"])


def test_text_prompt_is_capped_to_the_context_keeping_recent_events():
  cfg = efficiency.BenchConfig(history_lengths=(30,), llm="random", llm_preset="tiny",
                               encoder_preset="tiny", max_text_tokens=600, decode_steps=4)
  llm, tok, _ = efficiency.load_backbone(cfg)
  bench = efficiency.Benchmark(cfg, llm, tok, "tiny")
  tokens, info = bench.text_prompt(30)
  assert info["capped"] and 0 < info["events_kept"] < 30
  assert len(tokens) + cfg.decode_steps <= 600
  assert info["uncapped_prompt_tokens"] > 600
  # The most recent event survives the cut, the oldest does not.
  text = tok.decode(tokens)
  assert bench.events[-1] in text and bench.events[-30] not in text
  short, short_info = bench.text_prompt(2)
  assert not short_info["capped"] and bench.events[-2] in tok.decode(short)


def test_bad_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown variants"):
    efficiency.BenchConfig(variants=("xattn", "prefix_tuning"))


def test_add_ratios_uses_reference_and_uncapped():
  entry = {"variants": {
      "text_prompt": {"flops": 100.0, "latency_s": 2.0, "uncapped_flops": 400.0},
      "xattn": {"flops": 10.0, "latency_s": 1.0},
      "xattn_perceiver": {"flops": 5.0, "latency_s": 0.5}}}
  efficiency.add_ratios(entry)
  assert entry["reference"] == "xattn_perceiver"
  assert entry["flops_ratio"] == 20.0 and entry["latency_ratio"] == 4.0
  assert entry["flops_ratio_uncapped"] == 80.0
  np.testing.assert_allclose(entry["ratios"]["xattn"]["flops_ratio"], 10.0)
