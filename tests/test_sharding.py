"""Mesh construction and logical-axis rules."""

import jax
import pytest
from flax import nnx

from user_llm_jax import sharding

P = jax.sharding.PartitionSpec


def test_minus_one_takes_the_remaining_devices():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("shape, message", [
    ((2, 2, 1), "needs 4 devices, but 8"),
    ((3, -1, 1), "does not divide 8 devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((8, 1), "does not match axis names"),
])
def test_bad_mesh_shape_is_a_mesh_error_naming_the_key(shape, message):
  with pytest.raises(sharding.MeshError, match=message) as e:
    sharding.make_mesh(shape)
  assert "mesh.shape" in str(e.value)


def test_rules_never_use_a_mesh_axis_twice():
  # 'batch' takes data and fsdp, so 'embed' (-> fsdp) must stay unsharded.
  assert sharding.logical_to_mesh_spec(("batch", "length", "embed")) == P(
      ("data", "fsdp"), None, None)
  assert sharding.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")
  with pytest.raises(KeyError, match="no sharding rule"):
    sharding.logical_to_mesh_spec(("nonsense",))


def test_shard_model_places_params_by_their_logical_names():
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
  before = layer.kernel[...]
  sharding.shard_model(layer, sharding.make_mesh((2, 2, 2)))
  assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert layer.bias[...].sharding.spec == P()
  assert (layer.kernel[...] == before).all()
