"""Global magnitude pruning masks, as pure functions on parameter pytrees.

A *mask* is a pytree with the structure and shapes of the parameters and
boolean leaves: True keeps a weight. Leaves that are not prunable (biases,
norm scales and offsets, and kernels excluded by a regex) are all True, so
``apply_mask`` can treat every leaf alike. Which leaves are prunable is a
static property of the parameter *paths*, computed once with
``compute_prunable`` and passed around as a pytree of Python bools.

The mask has no particle axis: all particles of a round share one ticket.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRUNABLE_LEAF_NAME = "kernel"


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def compute_prunable(params, exclude: Sequence[str] = ()):
  """Which leaves of ``params`` are pruned.

  A leaf is prunable when it is a conv or dense kernel (its name is
  ``kernel``) and its '/'-joined path matches none of ``exclude`` (regexes,
  ``re.search`` semantics, e.g. ``'Conv_0'`` for the first conv or
  ``'Dense_\\d+$'`` ...).

  Args:
    params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``); no
      particle axis needed, only paths are read.
    exclude: regexes over leaf paths.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Raises:
    ValueError: an ``exclude`` entry is not a valid regex, or nothing is left
      to prune.
  """
  patterns = []
  for pattern in exclude:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"prune exclude pattern {pattern!r} is not a valid regex: {e}") from e

  def is_prunable(path, _):
    name = _path_str(path)
    return name.split("/")[-1] == PRUNABLE_LEAF_NAME and not any(p.search(name) for p in patterns)

  prunable = jax.tree_util.tree_map_with_path(is_prunable, params)
  if not any(jax.tree_util.tree_leaves(prunable)):
    raise ValueError(
      f"no prunable weights: every kernel is excluded by prune exclude patterns {list(exclude)}"
    )
  return prunable


def create_dense_mask(params):
  """An all-True mask with the structure and shapes of ``params``."""
  return jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), dtype=jnp.bool_), params)


def apply_mask(tree, mask):
  """Zeroes the masked-out entries of ``tree`` (params, grads or updates).

  ``tree`` may carry leading axes (e.g. particles) that ``mask`` lacks; the
  mask broadcasts over them from the right. Dtypes are kept.
  """
  return jax.tree_util.tree_map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, mask)


def count_prunable(mask, prunable) -> tuple[jax.Array, int]:
  """(surviving, total) counts over the prunable leaves of ``mask``."""
  pairs = zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(prunable), strict=True)
  kept = [m for m, p in pairs if p]
  return sum(jnp.sum(m, dtype=jnp.int32) for m in kept), sum(int(np.prod(m.shape)) for m in kept)


def compute_sparsity(mask, prunable) -> float:
  """Fraction of prunable weights that ``mask`` removes, measured from the mask."""
  kept, total = count_prunable(mask, prunable)
  return 1.0 - float(kept) / total


def compute_mask(params, mask, prunable, prune_fraction: float):
  """One round of global magnitude pruning.

  Over all prunable leaves together, removes the ``round(prune_fraction *
  surviving)`` surviving weights of smallest ``|params|``. Ties are broken
  deterministically by position in the flattened, leaf-ordered parameter
  vector (earlier goes first). Weights already pruned stay pruned whatever
  their value. Non-prunable leaves of the result are all True.

  Args:
    params: parameter pytree, no particle axis (e.g. the particle average).
    mask: the current mask (same structure, bool leaves).
    prunable: ``compute_prunable(params, ...)``.
    prune_fraction: in (0, 1), of the *surviving* prunable weights.

  Returns:
    The new mask, a subset of ``mask``. Jittable (``prunable`` and
    ``prune_fraction`` static).
  """
  if not 0.0 < prune_fraction < 1.0:
    raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  mask_leaves = treedef.flatten_up_to(mask)
  prunable_leaves = treedef.flatten_up_to(prunable)
  idx = [i for i, p in enumerate(prunable_leaves) if p]
  scores = jnp.concatenate(
    [
      # Pruned weights score -1 (< any magnitude) so they sort first and stay out.
      jnp.where(mask_leaves[i], jnp.abs(leaves[i]).astype(jnp.float32), -1.0).ravel()
      for i in idx
    ]
  )
  alive = jnp.sum(scores >= 0)
  num_dead = scores.size - alive
  # float32 on purpose: expected_surviving() mirrors this rounding exactly.
  num_remove = jnp.round(jnp.float32(prune_fraction) * alive.astype(jnp.float32))
  num_remove = num_remove.astype(alive.dtype)
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  keep = rank >= num_dead + num_remove
  new_leaves = list(mask_leaves)
  offset = 0
  for i in idx:
    size = int(np.prod(leaves[i].shape))
    new_leaves[i] = keep[offset : offset + size].reshape(leaves[i].shape)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def expected_surviving(total: int, prune_fraction: float, num_prunes: int) -> int:
  """Surviving count after ``num_prunes`` rounds, with the same rounding as ``compute_mask``."""
  alive = total
  for _ in range(num_prunes):
    alive -= int(np.round(np.float32(prune_fraction) * np.float32(alive)))
  return alive
