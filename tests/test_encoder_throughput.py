"""Encoder throughput benchmark on a tiny encoder: both loss forms, the profile's top ops."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("throughput") / "encoder_throughput.json"
  profile = out.parent / "trace"
  subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.encoder_throughput",
       "--num_layers=1", "--width=16", "--num_heads=2", "--window=8", "--batch_size=8",
       "--num_items=60", "--steps=2", "--rounds=2", "--matmul_size=64", "--top_ops=5",
       f"--profile_dir={profile}", f"--output={out}"], check=True, capture_output=True)
  return json.loads(out.read_text()), out


def test_both_item_loss_forms_are_timed_and_compared(report):
  data, out = report
  step, textbook = data["step"], data["textbook_item_loss"]
  assert step["events_per_step"] == textbook["events_per_step"] == 8 * 8
  assert data["speedup_over_textbook"] == pytest.approx(
      textbook["sec_per_step"] / step["sec_per_step"])
  # The two forms are the same loss: the same first steps on the same batch.
  assert step["loss"] == pytest.approx(textbook["loss"], rel=1e-4)
  assert out.with_suffix(".png").stat().st_size > 0


def test_profile_lists_the_step_s_xla_ops_with_their_jax_source(report):
  data, out = report
  assert set(data["top_ops"]) == {"ours", "textbook"}
  for form, ops in data["top_ops"].items():
    assert 0 < len(ops) <= 5, form
    assert all(o["ms_per_step"] >= 0 and 0 <= o["share"] <= 1 and o["source"] for o in ops)
    assert [o["ms_per_step"] for o in ops] == sorted((o["ms_per_step"] for o in ops),
                                                     reverse=True)
    assert any("jit(step_fn)" in o["source"] for o in ops)
    assert list((out.parent / "trace" / form).rglob("*perfetto_trace.json.gz")), form
