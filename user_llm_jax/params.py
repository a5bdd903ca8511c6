"""Naming and counting of model parameters, shared by every model and job.

A parameter's name is the '/'-joined path of its variable in the model, e.g.
'layers/0/attn/q/kernel' or 'llm/cross_attention/0/attn_gate': the name `lr_mults` regexes
match, checkpoint importers map to, and reports print.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

Filter = Any  # an nnx filter: a Variable type, a predicate `(path, value) -> bool`, ...


def param_path(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a pytree key path (of an `nnx.State` or a plain tree).

  The trailing attribute key a flattened `nnx.Variable` adds ('value') is not a name and is
  dropped. Dict keys, attribute names and sequence indices all print as their bare text.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in (
      "value", "raw_value"):
    path = path[:-1]
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return "/".join(names)


def count_params(model: nnx.Module, wrt: Filter = nnx.Param) -> int:
  """Number of scalar parameters of `model` (or of an abstract one) selected by `wrt`."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, wrt))))
