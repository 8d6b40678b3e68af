"""Any model in the one functional form the library uses: ``init`` and ``apply`` as in linen.

The training step, evaluation, BatchNorm recompute and the analyses call
``model.init(key, x, train=False)`` and ``model.apply(variables, x, train=...,
mutable=['batch_stats'])`` with ``variables = {'params': ..., 'batch_stats': ...}``
(plain nested dicts). A ``flax.linen.Module`` has that form. A
``flax.nnx.Module`` is lifted here, in one place, with ``nnx.split``/``nnx.merge``:
its ``nnx.Param``s become ``params``, its ``nnx.BatchStat``s ``batch_stats``,
and each ``apply`` merges the (traced) arrays into a fresh module and calls it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


class NnxModel:
  """An ``nnx.Module`` in linen's functional form (hashable by identity: a static jit argument).

  ``create(key)`` returns the module; ``key`` is the run's initialization key, which
  a module passed as an object ignores (its own weights are the initialization).
  """

  def __init__(self, create: Callable, template: nnx.Module):
    graphdef, params, batch_stats, rest = nnx.split(template, nnx.Param, nnx.BatchStat, ...)
    other = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(rest, is_leaf=_is_var)})
    if other:
      raise ValueError(
        f"the NNX model {type(template).__name__} holds variables of types {other}: SWAMP "
        "trains nnx.Param and keeps BatchNorm statistics (nnx.BatchStat) only (a Dropout's "
        "RNG state, for instance, cannot be averaged over particles)"
      )
    self.module_type = type(template)
    self._create = create
    self._graphdef = graphdef
    self._treedefs = {
      "params": jax.tree_util.tree_structure(params),
      "batch_stats": jax.tree_util.tree_structure(batch_stats),
    }

  def __repr__(self):
    return f"NnxModel({self.module_type.__name__})"

  def _split(self, module) -> dict:
    _, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    variables = {"params": params, "batch_stats": batch_stats}
    for name, state in variables.items():
      pure = nnx.to_pure_dict(state)
      # apply() rebuilds the state from the pure dict's leaves in this order: check it is one.
      if any(
        a is not b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(pure), strict=True)
      ):
        raise ValueError(f"{self!r}: its {name} state and pure dict order leaves differently")
      variables[name] = pure
    return variables

  def _merge(self, variables):
    states = [
      jax.tree_util.tree_unflatten(self._treedefs[c], jax.tree.leaves(variables.get(c, {})))
      for c in ("params", "batch_stats")
    ]
    return nnx.merge(self._graphdef, *states)

  def init(self, key, x, train: bool = False) -> dict:
    """The module's variables ``{'params', 'batch_stats'}`` (``x`` and ``train`` unused)."""
    del x, train
    return self._split(self._create(key))

  def apply(self, variables, x, train: bool, mutable=False):
    """Logits of ``x``; with ``mutable`` also ``{'batch_stats': new statistics}``."""
    module = self._merge(variables)
    logits = module(x, train=train)
    if not mutable:
      return logits
    return logits, {"batch_stats": self._split(module)["batch_stats"]}

  def compute_batch_statistics(self, variables, x):
    """The statistics of batch ``x`` alone: every nnx.BatchNorm run at momentum 0."""
    module = self._merge(variables)
    for _, node in nnx.iter_graph(module):
      if isinstance(node, nnx.BatchNorm):
        node.momentum = 0.0
    module(x, train=True)
    return self._split(module)["batch_stats"]


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def as_functional(model):
  """``model`` in the functional form: an nnx.Module lifted (its weights are the
  initialization), anything else unchanged."""
  if isinstance(model, nnx.Module):
    return NnxModel(lambda key: model, model)
  return model


def create_nnx_model(factory: Callable, num_classes: int, *args, **options):
  """A factory taking ``rngs``: called with ``nnx.Rngs(key)`` of the run's init key."""

  def create(key):
    return factory(num_classes, *args, rngs=nnx.Rngs(key), **options)

  template = create(jax.random.key(0))
  if not isinstance(template, nnx.Module):
    return template  # a linen factory that happens to take `rngs`
  return NnxModel(create, template)
