"""Ahead-of-time compile check for Cloud TPU slices (`user_llm_jax.tpu`).

Topology names, the abstract programs of the TPU configs (on the test's CPU mesh) and the
HBM message need nothing extra; compiling for a `v5e:2x2` slice needs libtpu (the `[tpu]`
extra) and is skipped without it.
"""

import importlib.util
import re

import numpy as np
import pytest

from experiments.configs import encoder_movielens
from experiments.configs import main as main_config
from experiments.configs import user_llm_movielens
from user_llm_jax import config as config_lib
from user_llm_jax import sharding
from user_llm_jax.tpu import compile_check
from user_llm_jax.tpu import programs
from user_llm_jax.tpu import topology

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): TPU topologies unavailable")

SMOKE_VOCAB = dict(num_items=300, num_ratings=7, num_categories=20)


@pytest.mark.parametrize("name,generation,shape,chips", [
    ("v5e-8", "v5e", (2, 4), 8),
    ("v5litepod-16", "v5e", (4, 4), 16),
    ("v5e-256", "v5e", (16, 16), 256),
    ("v6e-8", "v6e", (2, 4), 8),
    ("v5p-8", "v5p", (2, 2, 1), 4),       # v5p and v4 names count TensorCores, 2 per chip
    ("v5p-128", "v5p", (4, 4, 4), 64),
    ("v4-32", "v4", (2, 2, 4), 16),
    ("V5E:2x2", "v5e", (2, 2), 4),
])
def test_parses_cloud_tpu_names(name, generation, shape, chips):
  topo = topology.parse(name)
  assert (topo.chip.generation, topo.shape, topo.num_chips) == (generation, shape, chips)
  assert topo.topology_name == f"{generation}:{'x'.join(map(str, shape))}"
  assert topology.parse(name, num_slices=3).num_chips == 3 * chips


@pytest.mark.parametrize("name,slices,fragment", [
    ("v5e-7", 1, "no v5e slice has 7 chips; valid sizes: 1, 4, 8"),
    ("v5p-9", 1, "count TensorCores (2 per chip); 9 is not a multiple"),
    ("v5p-6", 1, "no v5p slice has 6 TensorCores; valid sizes: 8, 16"),
    ("v9-8", 1, "unknown TPU generation 'v9'"),
    ("v5e:2x2x2", 1, "v5e slices are 2D tori"),
    ("v5p:2x2", 1, "v5p slices are 3D tori"),
    ("tpu-8x", 1, "expected a Cloud TPU slice name such as v5e-8"),
    ("v5e-8", 0, "--num_slices=0: expected an integer >= 1"),
])
def test_rejects_bad_topology_names(name, slices, fragment):
  with pytest.raises(topology.TopologyError, match=re.escape(fragment)):
    topology.parse(name, slices)


def _cpu_mesh(config):
  mesh = sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
  return mesh, sharding.normalize_rules(config.mesh.rules)


def test_vocabulary_sizes_come_from_the_config():
  config = encoder_movielens.get_config()  # a CPU config: no target sizes set
  with pytest.raises(config_lib.ConfigError, match=r"'aot.num_items' is 0.*--config.aot"):
    programs.plan(config, *_cpu_mesh(config))
  config.aot.update(SMOKE_VOCAB)
  plan = programs.plan(config, *_cpu_mesh(config))
  assert plan.facts["encoder_architecture"]["num_items"] == 300


def test_encoder_tpu_variant_is_paper_size_at_ml20m_in_bfloat16():
  config = encoder_movielens.get_config("tpu")
  plan = programs.plan(config, *_cpu_mesh(config))
  arch = plan.facts["encoder_architecture"]
  assert (arch["num_layers"], arch["width"], arch["num_items"]) == (6, 128, 26_746)
  assert (arch["dtype"], arch["param_dtype"]) == ("bfloat16", "float32")
  assert [p.name for p in plan.programs] == ["encoder/train_step", "encoder/eval_ranks"]
  assert plan.programs[0].batch == 1024 and plan.programs[0].tokens == 1024 * 50


@pytest.mark.parametrize("preset,width,layers", [
    ("llama_3_2_1b", 2048, 16), ("llama_3_2_3b", 3072, 28), ("smollm2_1_7b", 2048, 24)])
def test_user_llm_tpu_variant_selects_presets_in_bfloat16(preset, width, layers):
  config = user_llm_movielens.get_config("tpu")
  config.llm.preset = preset
  config.bridge.use_perceiver = True
  plan = programs.plan(config, *_cpu_mesh(config))
  arch = plan.facts["user_llm_architecture"]
  assert (arch["llm"]["width"], arch["llm"]["num_layers"]) == (width, layers)
  assert arch["llm"]["dtype"] == arch["llm"]["param_dtype"] == "bfloat16"
  assert arch["bridge"]["use_perceiver"] and arch["strategy"] == "enc"
  assert "is not on this host" in plan.facts["user_llm_llm"]
  state = plan.facts["user_llm_state"]
  # Frozen LLM weights are stored in bfloat16; what trains (encoder, bridge, blocks) and
  # its Adam moments stay float32.
  assert state["model"]["bfloat16"] > 2 * 1e9
  assert "bfloat16" not in state["optimizer"] and state["optimizer"]["float32"] > 0
  assert [p.name.split("/")[1] for p in plan.programs] == [
      "train_step", "user_context", "prefill", "decode"]


def test_main_tpu_variant_has_both_stages():
  config = main_config.get_config("tpu")
  plan = programs.plan(config, *_cpu_mesh(config))
  names = [p.name for p in plan.programs]
  assert names[:2] == ["encoder/train_step", "encoder/eval_ranks"]
  assert "user_llm/decode" in names and "user_llm/eval_item_head" in names
  assert plan.facts["encoder_architecture"]["width"] == 128  # paper size, not the CPU's 64


def _report(**row) -> compile_check.Report:
  chip = topology.CHIPS["v5e"]
  defaults = dict(name="encoder/train_step", batch=4096, tokens=4096 * 50, unit="events",
                  note="", ok=False, argument_bytes=2**30, output_bytes=2**30,
                  alias_bytes=2**30, temp_bytes=20 * 2**30, hbm_needed=21 * 2**30,
                  largest_values=[(40 * 2**30, "stablehlo.dot_general",
                                   "tensor<4096x50x26746xf32>", "jit(step_fn)/dot_general")])
  defaults.update(row)
  return compile_check.Report(
      config_name="c", topology="v5e-8", topology_name="v5e:2x4", num_slices=1, num_chips=8,
      device_kind=chip.device_kind, hbm_bytes=chip.hbm_bytes,
      peak_bf16_flops=chip.peak_bf16_flops, hbm_bandwidth=chip.hbm_bandwidth,
      mesh={"data": 8, "fsdp": 1, "tensor": 1}, rows=[compile_check.Row(**defaults)],
      facts={"encoder_state": {"model": {"float32": 2**20}}})


def test_over_hbm_message_names_hbm_buffers_and_remedies():
  with pytest.raises(compile_check.HbmError) as info:
    compile_check.raise_if_over(_report())
  message = str(info.value)
  for fragment in ("does not fit in HBM on v5e-8", "16.00 GiB HBM per chip",
                   "needs 21.00 GiB per chip", "temporaries 20.00 GiB",
                   "tensor<4096x50x26746xf32>", "~5.00 GiB per chip",
                   "4096 global = 512 per chip", "fsdp", "remat"):
    assert fragment in message, fragment
  compile_check.raise_if_over(_report(ok=True, hbm_needed=2**30))  # fits: no error


def test_matmul_audit_counts_flops_by_operand_dtype():
  text = (
      '%0 = stablehlo.dot_general %a, %b, contracting_dims = [2] x [0] : '
      '(tensor<8x30x32xbf16>, tensor<32x300xbf16>) -> tensor<8x30x300xbf16> loc(#loc1)\n'
      '%1 = stablehlo.dot_general %c, %d, contracting_dims = [1] x [0] : '
      '(tensor<4x16xf32>, tensor<16x8xf32>) -> tensor<4x8xf32> loc(#loc2)\n'
      '#loc1 = loc("jit(f)/bf16_dot")\n#loc2 = loc("jit(f)/f32_dot")\n')
  audit = compile_check.matmul_audit(text)
  bf16, f32 = 2 * 8 * 30 * 300 * 32, 2 * 4 * 8 * 16
  assert audit["flops_by_dtype"] == {"bf16": bf16, "f32": f32}
  assert audit["bf16_share"] == pytest.approx(bf16 / (bf16 + f32))
  assert audit["largest_non_bf16"][0][2] == "jit(f)/f32_dot"


def _smoke_encoder(**train):
  config = encoder_movielens.get_config("smoke")
  config.aot.update(SMOKE_VOCAB)
  config.encoder.model.dtype = "bfloat16"
  config.train.update(train)
  return config


@needs_libtpu
def test_multi_slice_mesh_puts_the_slices_on_the_data_axis():
  config = _smoke_encoder()
  mesh, _ = compile_check.build_mesh(config, topology.parse("v5e:2x2", num_slices=2))
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 8, "fsdp": 1, "tensor": 1}
  slices = [d.slice_index for d in mesh.devices.reshape(-1)]
  assert slices == [0] * 4 + [1] * 4


@needs_libtpu
def test_compiles_a_small_config_for_v5e_2x2():
  config = _smoke_encoder()
  report = compile_check.run(config, topology.parse("v5e:2x2"), log=lambda _: None)
  assert report.device_kind == "TPU v5 lite" and report.mesh["data"] == 4
  train, evaluation = report.rows
  assert train.ok and evaluation.ok, (train.error, evaluation.error)
  # The donated state comes back aliased; the step needs its activations as temporaries.
  assert 0 < train.alias_bytes <= train.argument_bytes and train.temp_bytes > 0
  assert 0 < train.hbm_needed < report.hbm_bytes
  assert train.flops > evaluation.flops > 0 and train.step_seconds_est > 0
  assert train.matmuls["bf16_share"] > 0.5   # the encoder's matmuls run in bfloat16
  assert np.isclose(train.throughput_est, train.tokens / train.step_seconds_est)
  text = compile_check.table(report)
  assert "| encoder/train_step | 32 (8) |" in text and "GiB" in text and "estimate" in text


@needs_libtpu
def test_a_batch_over_hbm_fails_naming_hbm():
  config = _smoke_encoder(batch_size=1_048_576)
  report = compile_check.run(config, topology.parse("v5e:2x2"), log=lambda _: None,
                             only=("train_step",))
  (row,) = report.rows
  assert not row.ok
  with pytest.raises(compile_check.HbmError, match=r"(?s)does not fit in HBM.*HBM.*batch"):
    compile_check.raise_if_over(report)

