"""MLP projection from the user encoder's width to the LLM's width."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.sharding import partitioned


class Projection(nnx.Module):
  """`num_layers` dense layers with GELU in between: [..., D_in] -> [..., D_out].

  The default (2 layers, hidden width = output width) follows the paper's "projection layer"
  bridge; `num_layers=1` is a plain affine map.
  """

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None,
               num_layers: int = 2, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the MLP.

    Args:
      in_dim: encoder width.
      out_dim: LLM width.
      hidden_dim: width of the hidden layers (default: `out_dim`).
      num_layers: number of dense layers (>= 1).
      dtype: compute dtype.
      param_dtype: storage dtype.
      rngs: random streams (`params`).
    """
    if num_layers < 1:
      raise ValueError(f"projection num_layers must be >= 1, got {num_layers}")
    hidden_dim = hidden_dim or out_dim
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    self.dtype = dtype
    # The first kernel reads the encoder width, hidden ones the MLP width.
    kernel_axes = [("embed", "mlp")] + [("mlp", "mlp")] * (num_layers - 2) + [("mlp", "embed")]
    if num_layers == 1:
      kernel_axes = [("features", "embed")]
    kernels, biases = [], []
    for (d_in, d_out), axes in zip(zip(dims[:-1], dims[1:]), kernel_axes):
      kinit = partitioned(nnx.initializers.lecun_normal(), axes)
      binit = partitioned(nnx.initializers.zeros_init(), (axes[1],))
      kernels.append(nnx.Param(kinit(rngs.params(), (d_in, d_out), param_dtype)))
      biases.append(nnx.Param(binit(rngs.params(), (d_out,), param_dtype)))
    self.kernels = nnx.List(kernels)
    self.biases = nnx.List(biases)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, E, D_in] -> [B, E, D_out] in the compute dtype."""
    h = x.astype(self.dtype)
    for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
      h = jnp.einsum("BEI,IO->BEO", h, kernel[...].astype(self.dtype))
      h = h + bias[...].astype(self.dtype)
      if i < len(self.kernels) - 1:
        h = jax.nn.gelu(h)
    return sharding.with_logical_constraint(h, sharding.ACT_BTD)
