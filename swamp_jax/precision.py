"""Mixed precision: compute in bfloat16, keep every stored number in float32.

One policy for any Flax model, applied where the model is called: the float
params and the float input are cast to the compute dtype inside ``apply``, and
the output (logits) comes back as float32. Everything the library keeps (the
params the optimizer updates, its state, SWA means, particle averages, masks,
BatchNorm statistics) stays float32; gradients reach the float32 params
through the cast, so they are float32 too, and losses are taken from float32
logits. Flax's BatchNorm computes batch statistics in float32 even from
bfloat16 input (``force_float32_reductions``) and keeps its running
statistics float32, so BN models need nothing of their own.

``with_compute_dtype(model, dtype)`` wraps a model in this policy; the rest
of the library calls the wrapper as it calls the model (``init``, ``apply``,
``compute_batch_statistics``), so training, evaluation and BatchNorm recompute
all use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def _cast_floats(tree, dtype):
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree_util.tree_map(cast, tree)


def _to_float32(tree, compute_dtype):
  return jax.tree_util.tree_map(
    lambda x: x.astype(jnp.float32) if x.dtype == compute_dtype else x, tree
  )


@dataclasses.dataclass(frozen=True)
class MixedPrecisionModel:
  """``module`` computing in ``compute_dtype`` with float32 variables and outputs.

  ``init`` returns the module's own (float32) variables: the param tree is the
  module's, so weights move freely between a float32 and a mixed-precision run.
  ``apply(variables, x, ...)`` casts the float ``params`` and a float ``x`` to
  ``compute_dtype`` and returns float32 outputs (and, with ``mutable``, float32
  updated collections). Other attributes (``num_classes``, ``bn_momentum``)
  are the module's.
  """

  module: Any
  compute_dtype: str

  def init(self, *args, **kwargs):
    return self.module.init(*args, **kwargs)

  def _cast_inputs(self, variables, x):
    """The float ``params`` and ``x`` in the compute dtype; other collections as they are."""
    dtype = jnp.dtype(self.compute_dtype)
    variables = {
      name: _cast_floats(collection, dtype) if name == "params" else collection
      for name, collection in variables.items()
    }
    return variables, _cast_floats(x, dtype)

  def apply(self, variables, x, *args, **kwargs):
    out = self.module.apply(*self._cast_inputs(variables, x), *args, **kwargs)
    return _to_float32(out, jnp.dtype(self.compute_dtype))

  def compute_batch_statistics(self, variables, x):
    """``batchnorm.compute_batch_statistics`` of the module, computing as ``apply`` does
    (an NNX module's own method would otherwise skip the cast)."""
    from swamp_jax import batchnorm

    stats = batchnorm.compute_batch_statistics(self.module, *self._cast_inputs(variables, x))
    return _to_float32(stats, jnp.dtype(self.compute_dtype))

  def clone(self, **updates) -> MixedPrecisionModel:
    return dataclasses.replace(self, module=self.module.clone(**updates))

  def __getattr__(self, name: str):
    if name in ("module", "compute_dtype"):  # not yet set (copy, unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.module, name)


def with_compute_dtype(model, dtype: str):
  """``model`` computing in ``dtype``, one of ``COMPUTE_DTYPES``.

  'float32' returns ``model`` itself (today's programs, unchanged); 'bfloat16'
  returns a ``MixedPrecisionModel``. Anything else raises ``ValueError``.
  """
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
  return model if dtype == "float32" else MixedPrecisionModel(model, dtype)
