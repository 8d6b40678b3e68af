"""Pruning masks, as pure functions on parameter pytrees.

A *mask* is a pytree with the structure and shapes of the parameters and
boolean leaves: True keeps a weight. Leaves that are not prunable (biases,
norm scales and offsets, and kernels excluded by a regex) are all True, so
``apply_mask`` can treat every leaf alike. Which leaves are prunable is a
static property of the parameter *paths*, computed once with
``compute_prunable`` and passed around as a pytree of Python bools.

A round of pruning is one ``compute_mask`` call; every rule sits behind it,
as a ``PruningRule``: a *criterion* scores the prunable weights (higher
keeps: ``|w|``, random numbers, or a user's function) and a *scope* says
where the count is taken (over all prunable weights at once, or per layer).
The same exact-count selection then removes the lowest-scoring surviving
weights; weights already pruned stay pruned whatever their score.

The mask has no particle axis: all particles of a round share one ticket.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRUNABLE_LEAF_NAMES = ("kernel",)  # Dense, DenseGeneral (attention) and conv kernels of any rank
SCOPES = ("global", "layerwise")
CRITERIA = ("magnitude", "random")
# Counts are computed in int32 as a*q + (a*r + b//2)//b (n = q*b + r, p = a/b), and
# a*r + b//2 < b*b stays below 2**31 for every denominator b up to this.
MAX_DENOMINATOR = 46340


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def compute_prunable(
  params, exclude: Sequence[str] = (), leaves: Sequence[str] = PRUNABLE_LEAF_NAMES
):
  """Which leaves of ``params`` are pruned.

  A leaf is prunable when its name (the last path component) is one of
  ``leaves`` and its '/'-joined path matches none of ``exclude`` (regexes,
  ``re.search`` semantics, e.g. ``'Conv_0'`` for the first conv or
  ``'Dense_\\d+$'`` ...). ``'kernel'`` covers Dense, DenseGeneral (e.g. the
  3-D query/key/value/out kernels of attention) and conv kernels of any
  rank; add ``'embedding'`` to prune ``nn.Embed`` tables.

  Args:
    params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``); no
      particle axis needed, only paths are read.
    exclude: regexes over leaf paths.
    leaves: leaf names that are prunable.

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
  names = frozenset(leaves)

  def is_prunable(path, _):
    name = _path_str(path)
    return name.split("/")[-1] in names and not any(p.search(name) for p in patterns)

  prunable = jax.tree_util.tree_map_with_path(is_prunable, params)
  if not any(jax.tree_util.tree_leaves(prunable)):
    raise ValueError(
      f"no prunable weights: no leaf named one of {sorted(names)} (prune leaves) is left "
      f"by prune exclude patterns {list(exclude)}"
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


# --- How many to remove: exact, in integers. ---


def as_fraction(prune_fraction) -> fractions.Fraction:
  """``prune_fraction`` as the exact rational its decimal string (or Fraction) spells.

  0.2 is 1/5, not the binary float nearest it, so counts are the decimal
  arithmetic a reader expects.

  Raises:
    ValueError: not in (0, 1), or its reduced denominator exceeds
      ``MAX_DENOMINATOR`` (any decimal with at most 4 places is fine).
  """
  try:
    p = fractions.Fraction(str(prune_fraction))
  except (ValueError, ZeroDivisionError) as e:
    raise ValueError(f"prune_fraction must be a number in (0, 1), got {prune_fraction!r}") from e
  if not 0 < p < 1:
    raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction!r}")
  if p.denominator > MAX_DENOMINATOR:
    raise ValueError(
      f"prune_fraction {prune_fraction!r} is {p} as a fraction; its denominator must be at "
      f"most {MAX_DENOMINATOR} for exact counts (round it to at most 4 decimal places)"
    )
  return p


def compute_num_remove(prune_fraction, alive):
  """``floor(p * alive + 1/2)`` exactly: ``round(p * alive)`` with halves rounded up.

  ``p = a/b`` is ``as_fraction(prune_fraction)``. With ``alive = q*b + r``
  the count is ``a*q + (a*r + b//2) // b``: every intermediate is below
  ``max(alive, b*b) < 2**31``, so int32 is exact for any count an int32 holds
  (and Python ints give the same numbers, see ``expected_surviving``).

  Args:
    prune_fraction: as for ``as_fraction``.
    alive: surviving count, a Python int or an integer array (traced is fine).

  Returns:
    int32 array (or Python int for a Python int ``alive``).
  """
  p = as_fraction(prune_fraction)
  a, b = p.numerator, p.denominator
  if not isinstance(alive, int):
    alive = jnp.asarray(alive, jnp.int32)
  q, r = alive // b, alive % b
  return a * q + (a * r + b // 2) // b


def expected_surviving(total: int, prune_fraction: float, num_prunes: int) -> int:
  """Surviving count after ``num_prunes`` global rounds, with ``compute_mask``'s counts."""
  alive = total
  for _ in range(num_prunes):
    alive -= compute_num_remove(prune_fraction, alive)
  return alive


# --- Scores: the criteria. Higher keeps; only prunable leaves are read. ---


def compute_magnitude_scores(params, prunable, key=None):
  """``|w|`` on prunable leaves (None elsewhere): magnitude pruning."""
  del key
  return jax.tree_util.tree_map(lambda w, p: jnp.abs(w) if p else None, params, prunable)


def compute_random_scores(params, prunable, key):
  """Uniform [0, 1) scores on prunable leaves: the lottery-ticket random baseline.

  One draw from ``key`` over all prunable weights, in flattened leaf order
  (flat: it compiles much faster than one draw per N-D leaf).
  """
  if key is None:
    raise ValueError("the 'random' prune criterion needs a key (e.g. imp.prune_key(seed, round))")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flags = treedef.flatten_up_to(prunable)
  sizes = [int(np.prod(jnp.shape(w))) for w, p in zip(leaves, flags, strict=True) if p]
  draws = iter(jnp.split(jax.random.uniform(key, (sum(sizes),)), np.cumsum(sizes)[:-1]))
  scores = [
    next(draws).reshape(jnp.shape(w)) if p else None for w, p in zip(leaves, flags, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, scores)


_SCORE_FUNCTIONS = {"magnitude": compute_magnitude_scores, "random": compute_random_scores}


@dataclasses.dataclass(frozen=True)
class PruningRule:
  """How a round prunes: static and hashable (a static argument of jitted programs).

  Attributes:
    scope: 'global' (one threshold over all prunable weights) or 'layerwise'
      (each prunable leaf loses the same fraction of its own survivors).
    criterion: 'magnitude' (``|w|``) or 'random' (needs a key).
    score_fn: a user's rule ``score_fn(params, prunable) -> scores``, a
      pytree with the structure of ``params`` whose prunable leaves are float
      arrays of the params' shapes (higher keeps; other leaves are ignored,
      None is fine). Replaces ``criterion`` when given.
  """

  scope: str = "global"
  criterion: str = "magnitude"
  score_fn: Callable | None = None

  def __post_init__(self):
    if self.scope not in SCOPES:
      raise ValueError(f"prune scope must be one of {SCOPES}, got {self.scope!r}")
    if self.criterion not in CRITERIA:
      raise ValueError(f"prune criterion must be one of {CRITERIA}, got {self.criterion!r}")
    if self.score_fn is not None and not callable(self.score_fn):
      raise ValueError(f"prune_score must be callable, got {type(self.score_fn).__name__}")

  def compute_scores(self, params, prunable, key=None):
    """Scores with the structure of ``params`` (prunable leaves: float, params' shapes)."""
    if self.score_fn is not None:
      return self.score_fn(params, prunable)
    return _SCORE_FUNCTIONS[self.criterion](params, prunable, key)


def _scores_up_to(scores, params):
  """The leaves of ``scores`` at the leaf positions of ``params``, or a ValueError naming one."""
  treedef = jax.tree_util.tree_structure(params)
  try:
    return treedef.flatten_up_to(scores)
  except (ValueError, TypeError) as e:
    param_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    score_paths = [
      _path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)[0]
    ]
    missing = [
      p for p in param_paths if not any(s == p or s.startswith(p + "/") for s in score_paths)
    ]
    extra = [
      s for s in score_paths if not any(s == p or s.startswith(p + "/") for p in param_paths)
    ]
    where = f"no score leaf for param {missing[0]!r}" if missing else ""
    if extra:
      where += ("; " if where else "") + f"score leaf {extra[0]!r} is not a param"
    raise ValueError(
      f"prune_score must return a pytree with the structure of params ({where or e})"
    ) from e


def check_scores(scores, params, prunable) -> list:
  """Checks scores against ``params`` (structure; shape and float dtype of prunable leaves).

  Works on arrays, tracers and ``jax.ShapeDtypeStruct`` alike.

  Returns:
    The score leaves, in the flattened order of ``params``.

  Raises:
    ValueError: naming the first leaf that does not fit.
  """
  score_leaves = _scores_up_to(scores, params)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  for (path, w), s, p in zip(
    paths_leaves, score_leaves, treedef.flatten_up_to(prunable), strict=True
  ):
    if not p:
      continue
    name = _path_str(path)
    if not hasattr(s, "shape") or not hasattr(s, "dtype"):
      raise ValueError(f"prune_score: the score of {name!r} is {type(s).__name__}, not an array")
    if tuple(s.shape) != tuple(jnp.shape(w)):
      raise ValueError(
        f"prune_score: the score of {name!r} has shape {tuple(s.shape)}, "
        f"but the param has shape {tuple(jnp.shape(w))}"
      )
    if not jnp.issubdtype(s.dtype, jnp.floating):
      raise ValueError(f"prune_score: the score of {name!r} has dtype {s.dtype}, not a float dtype")
  return score_leaves


def check_score_fn(score_fn, params, prunable) -> None:
  """Refuses a user's ``score_fn`` before training: on the initial ``params``,
  its scores must fit (``check_scores``, via ``jax.eval_shape``) and be finite.

  Raises:
    ValueError: naming the first leaf that does not fit or is not finite.
  """
  score = lambda q: score_fn(q, prunable)
  check_scores(jax.eval_shape(score, params), params, prunable)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = treedef.flatten_up_to(prunable)

  def finite(q):
    scores = treedef.flatten_up_to(score(q))
    return [jnp.all(jnp.isfinite(s)) if p else True for s, p in zip(scores, flags, strict=True)]

  for (path, _), ok in zip(leaves, jax.jit(finite)(params), strict=True):
    if not bool(ok):
      raise ValueError(
        f"prune_score: the score of {_path_str(path)!r} is not finite (NaN or inf) "
        "on the initial params"
      )


# --- Selection: the shared base of every rule. ---


def _select(scores, alive, prune_fraction):
  """Keep flags [n] for flat ``scores`` [n] and ``alive`` [n] (bool).

  Removes the ``compute_num_remove(prune_fraction, sum(alive))`` alive entries
  of lowest score; dead entries sort before every alive one, so they stay out
  whatever their score. Ties go by position (earlier goes first).
  """
  n = scores.size
  position = jnp.arange(n, dtype=jnp.int32)
  *_, order = jax.lax.sort((alive.astype(jnp.int32), scores, position), num_keys=3)
  num_alive = jnp.sum(alive, dtype=jnp.int32)
  cut = (n - num_alive) + compute_num_remove(prune_fraction, num_alive)
  return jnp.zeros((n,), jnp.bool_).at[order].set(position >= cut)


def compute_mask(
  params, mask, prunable, prune_fraction: float, rule: PruningRule | None = None, *, key=None
):
  """One round of pruning: the lowest-scoring surviving weights are removed.

  With the default rule (global magnitude pruning), over all prunable leaves
  together, removes the ``round(prune_fraction * surviving)`` surviving
  weights of smallest ``|params|``. With ``rule.scope == 'layerwise'`` each
  prunable leaf loses ``round(prune_fraction * surviving_in_leaf)`` of its
  own. Counts are exact in integers: ``round(x)`` is ``floor(x + 1/2)``
  (halves up; ``compute_num_remove``). Ties are broken deterministically by
  position in the flattened, leaf-ordered parameter vector (earlier goes
  first). Weights already pruned stay pruned whatever their score, so the
  mask only shrinks. Non-prunable leaves of the result are all True.

  Args:
    params: parameter pytree, no particle axis (e.g. the particle average).
    mask: the current mask (same structure, bool leaves).
    prunable: ``compute_prunable(params, ...)``.
    prune_fraction: in (0, 1), of the *surviving* prunable weights.
    rule: a ``PruningRule``; None is global magnitude pruning.
    key: PRNG key of the 'random' criterion (e.g. ``imp.prune_key``).

  Returns:
    The new mask, a subset of ``mask``. Jittable (``prunable``,
    ``prune_fraction`` and ``rule`` static).

  Raises:
    ValueError: bad ``prune_fraction``, scores that do not fit ``params``
      (at trace time, naming the leaf), or a random rule without ``key``.
  """
  as_fraction(prune_fraction)
  rule = PruningRule() if rule is None else rule
  leaves, treedef = jax.tree_util.tree_flatten(params)
  mask_leaves = treedef.flatten_up_to(mask)
  prunable_leaves = treedef.flatten_up_to(prunable)
  score_leaves = check_scores(rule.compute_scores(params, prunable, key), params, prunable)
  idx = [i for i, p in enumerate(prunable_leaves) if p]
  dtype = jnp.result_type(*(score_leaves[i].dtype for i in idx))
  scores = [score_leaves[i].astype(dtype).ravel() for i in idx]
  alive = [jnp.asarray(mask_leaves[i], jnp.bool_).ravel() for i in idx]
  if rule.scope == "global":
    keep = _select(jnp.concatenate(scores), jnp.concatenate(alive), prune_fraction)
    keep = jnp.split(keep, np.cumsum([s.size for s in scores])[:-1])
  else:
    keep = [_select(s, m, prune_fraction) for s, m in zip(scores, alive, strict=True)]
  new_leaves = list(mask_leaves)
  for i, k in zip(idx, keep, strict=True):
    new_leaves[i] = k.reshape(jnp.shape(leaves[i]))
  return jax.tree_util.tree_unflatten(treedef, new_leaves)
