"""What the library needs of a model, checked before any training: errors name the broken part.

A model maps inputs [batch, *input_shape] to logits [batch, num_classes] via
``model.apply(variables, x, train=...)``; its variables are ``params`` and,
when it has BatchNorm, ``batch_stats`` (nothing else: a run averages params
and recomputes statistics, and knows no other state); some params are
prunable (``masking.compute_prunable``).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from swamp_jax import masking
from swamp_jax.models import lifting

_COLLECTIONS = ("params", "batch_stats")


def _describe(model) -> str:
  return type(model).__name__ if not isinstance(model, lifting.NnxModel) else repr(model)


def check_train_argument(model) -> None:
  """Raises ValueError when ``model.__call__`` has no ``train`` argument."""
  cls = model.module_type if isinstance(model, lifting.NnxModel) else type(model)
  try:
    parameters = inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return  # no signature to read: the first call says what is wrong
  if "train" not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
    raise ValueError(
      f"the model {cls.__name__}'s __call__{inspect.signature(cls.__call__)} has no `train` "
      "argument: a model must be called as model(x, train: bool) (True while training: "
      "BatchNorm uses and updates batch statistics; False to evaluate)"
    )


def check_model(
  model, input_shape, num_classes: int, key, prune_leaves, prune_exclude
) -> tuple[dict, int]:
  """Initializes ``model`` on inputs of ``input_shape`` and checks the contract.

  Args:
    model: in the functional form (``lifting.as_functional``).
    input_shape: one example's shape (e.g. [H, W, C]).
    num_classes: the dataset's classes (labels are 0 .. num_classes - 1).
    key: the init key.
    prune_leaves, prune_exclude: as ``config.prune_leaves`` / ``config.prune_exclude``.

  Returns:
    ``(variables, num_logits)``: the initial variables ``{'params': ..., 'batch_stats':
    ... (possibly {})}`` and the number of logits the model returns.

  Raises:
    ValueError: naming the broken part: no ``train`` argument, collections other
      than params and batch_stats, logits that are not [batch, classes], fewer logits
      than the dataset has classes, or no prunable weights.
  """
  name = _describe(model)
  check_train_argument(model)
  # Under jit: one program, instead of one compiled per initializer and layer when eager.
  init = jax.jit(functools.partial(model.init, train=False))
  variables = dict(init(key, jnp.zeros((1, *input_shape), jnp.float32)))
  other = sorted(set(variables) - set(_COLLECTIONS))
  if other:
    raise ValueError(
      f"the model {name} has variable collections {other} besides params and batch_stats: "
      "SWAMP averages params and recomputes batch_stats, and keeps no other state"
    )
  variables.setdefault("batch_stats", {})
  batch = 2
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  for train in (True, False):
    apply = lambda v, x, train=train: model.apply(  # noqa: E731
      v, x, train=train, **({"mutable": ["batch_stats"]} if train else {})
    )
    out = jax.eval_shape(apply, variables, x)
    logits = out[0] if train else out
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) != 2 or shape[0] != batch:
      raise ValueError(
        f"the model {name} returns logits of shape {shape} for a batch of {batch} inputs of "
        f"shape {tuple(input_shape)} (train={train}): it must return [batch, num_classes] = "
        f"[{batch}, {num_classes}]"
      )
    if shape[1] < num_classes:
      raise ValueError(
        f"the dataset's labels go up to {num_classes - 1} but the model {name} returns "
        f"{shape[1]} logits: build it for num_classes={num_classes}"
      )
  try:
    masking.compute_prunable(variables["params"], prune_exclude, prune_leaves)
  except ValueError as e:
    names = sorted({p[-1] for p in _leaf_paths(variables["params"])})
    raise ValueError(
      f"the model {name} has no prunable weights ({e}); its param leaves are named "
      f"{names}: set config.prune_leaves (e.g. ('kernel', 'embedding'))"
    ) from e
  return variables, shape[1]


def _leaf_paths(params):
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  return [tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path) for path, _ in paths]


def count_params(params) -> int:
  """Total number of entries in a pytree of arrays (or `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
