"""Mesh construction and logical-axis rules."""

import flax.linen
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


def test_rules_context_overrides_defaults_by_name_and_nests():
  assert sharding.active_rules() == sharding.DEFAULT_RULES
  with sharding.axis_rules([["embed", "tensor"], ("activation_batch", ["data"])]) as table:
    assert sharding.active_rules() == table
    assert dict(table)["embed"] == "tensor" and dict(table)["mlp"] == "tensor"
    assert sharding.logical_to_mesh_spec(("embed", "mlp")) == P("tensor", None)
    assert sharding.logical_to_mesh_spec(sharding.ACT_BTD) == P("data", None, None)
    with sharding.axis_rules(()):
      assert sharding.active_rules() == sharding.DEFAULT_RULES
    assert sharding.active_rules() == table
    # An explicit rules= argument wins over the context (merged over the defaults).
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules=()) == P("fsdp", "tensor")
    # The table lives in Flax's own context (`nnx.logical_axis_rules`).
    assert flax.linen.get_logical_axis_rules() == table
  assert sharding.active_rules() == sharding.DEFAULT_RULES


def test_default_activation_rules_reproduce_the_historical_layout():
  """Activation names map as the parameter names did at every call site before."""
  for old, new in [(("batch", "length", "embed"), sharding.ACT_BTD),
                   (("batch", "length", "mlp"), sharding.ACT_BTF),
                   (("batch", "length", "vocab"), sharding.ACT_BTV),
                   (("batch", "latents", "embed"), sharding.ACT_BQD),
                   (("batch", "length", "heads", "head_dim"), sharding.ACT_BENH),
                   (("batch", "length"), sharding.ACT_BE)]:
    assert sharding.logical_to_mesh_spec(new) == sharding.logical_to_mesh_spec(old), new


@pytest.mark.parametrize("rules, message", [
    ((("embedd", "fsdp"),), r"mesh.rules\[0\]: unknown logical axis 'embedd'"),
    ((("embed", "fsdp"), ("mlp", 3)), r"mesh.rules\[1\]: mesh axes must be None"),
    (("embed",), r"mesh.rules\[0\]: expected a \(logical axis, mesh axes\) pair"),
])
def test_bad_rules_name_the_entry(rules, message):
  with pytest.raises(ValueError, match=message):
    with sharding.axis_rules(rules):
      pass


def test_partitioned_rejects_an_unknown_axis_name():
  with pytest.raises(ValueError, match="unknown logical axes \\['emb'\\]"):
    sharding.partitioned(nnx.initializers.zeros_init(), ("emb", "mlp"))


def test_param_placement_follows_the_context_and_explicit_rules_win():
  init = sharding.partitioned(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.axis_rules((("embed", "tensor"), ("mlp", ("data", "fsdp")))):
    sharding.shard_model(layer, mesh)
    assert layer.kernel[...].sharding.spec == P("tensor", ("data", "fsdp"))
    placed = sharding.model_shardings(layer, mesh)
    assert placed["kernel"].spec == P("tensor", ("data", "fsdp"))
    sharding.shard_model(layer, mesh, rules=())
    assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")
  sharding.shard_model(layer, mesh)
  assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")


def _constrained_sharding(fn_rules, context_rules, mesh):
  """Sharding of an intermediate activation constrained inside a freshly traced jit."""
  seen = []

  def f(x):
    y = sharding.with_logical_constraint(x * 2.0, sharding.ACT_BTD, rules=fn_rules)
    jax.debug.inspect_array_sharding(y, callback=seen.append)
    return (y + 1.0).sum()

  with sharding.axis_rules(context_rules, mesh):
    jax.jit(f).lower(jax.ShapeDtypeStruct((8, 4, 16), jax.numpy.float32)).compile()
  (got,) = seen
  return got


def test_activation_constraints_follow_the_active_rules():
  mesh = sharding.make_mesh((2, 2, 2))
  default = _constrained_sharding(None, (), mesh)
  assert default.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
  custom = (("activation_batch", "data"), ("activation_embed", "tensor"),
            ("activation_length", "fsdp"))
  got = _constrained_sharding(None, custom, mesh)
  assert got.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data", "fsdp", "tensor")), 3)
  # Explicit rules at the call site win over the context.
  got = _constrained_sharding((), custom, mesh)
  assert got.is_equivalent_to(default, 3)
  # Without a mesh the constraint is a no-op.
  x = jax.numpy.ones((2, 3, 4))
  assert sharding.with_logical_constraint(x, sharding.ACT_BTD) is x
