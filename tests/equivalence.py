"""Tolerances for floats that two different programs compute from the same math.

Programs that do the same math but reduce in another order (a batch split over
devices or not, particles vmapped or looped, im2col or XLA's convolution, one
scan or several, two processes or one) give float32 results that differ by
rounding, by a different amount on every instruction set. A test comparing them
takes its tolerance from this module, derived from that arithmetic and never
fitted to what one machine printed. The same program run twice (a resumed run)
is compared bit for bit instead, never through here.

The derivation:

* ``U = 2**-24`` is float32's unit roundoff.
* A sum of n terms computed in any order is off from the exact sum by at most
  ``gamma_n * sum|x_i|``, ``gamma_n = n U / (1 - n U)`` (Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., eq. 4.4). That worst case needs
  every rounding to push the same way. With roundings modelled as independent
  zero-mean errors, the error stays below ``lam sqrt(n) U sum|x_i|`` except with
  probability at most about ``2 n exp(-lam^2 / 2)`` (Higham and Mary, "A new
  approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
  41(5), 2019); ``LAMBDA = 8`` puts that below 1e-9 for every n here. Two
  programs, each within that of the exact sum, differ by at most twice it:
  ``sum_rtol(n) = 2 LAMBDA sqrt(n) U``, relative to the scale of the terms.
* A longer computation: a value computed through ``depth`` reordered
  reductions in sequence (layer after layer, forward and backward; BatchNorm's
  batch statistics are reductions inside the forward pass), over ``steps``
  training steps, carries the rounding errors of ``steps * depth`` sums of up
  to n terms. To first order they add up, each carried forward unamplified (a
  few epochs of stable training at small learning rates: no divergence, which
  the tests also check), and under the same model of independent zero-mean
  roundings a sum of ``m`` of them grows like ``sqrt(m)``, not ``m``:
  ``training_rtol = 2 LAMBDA sqrt(steps * depth * n) U``.

Arrays are compared normwise, ``|a - b| <= rtol * scale``: a rounding error is
relative to the terms that were summed, not to an element that happens to come
out near zero. For one array the scale is its largest magnitude; for a pytree
(a network's weights) it is the largest magnitude of the whole tree, since a
leaf can sum to near zero from terms of the network's size (a conv bias before
BatchNorm gets gradients that cancel exactly in exact arithmetic, so its value
is rounding noise made of terms as large as any other weight's updates).

Two derived quantities are not continuous, and get their own checks: a mask
can differ only where a weight is within the tolerance of the pruning
threshold, and an accuracy only by the test examples whose two largest logits
are within the logits' tolerance of each other.
"""

from __future__ import annotations

import math

import jax
import numpy as np

U = 2.0**-24
LAMBDA = 8.0


def sum_rtol(n: int) -> float:
  """Two float32 sums of the same ``n`` terms in different orders: their relative difference."""
  return 2.0 * LAMBDA * math.sqrt(n) * U


def training_rtol(steps: int, reduction: int, depth: int = 1) -> float:
  """Weights after ``steps`` steps of two programs whose reductions (up to ``reduction``
  terms each, ``depth`` of them in sequence per step) run in different orders."""
  return sum_rtol(steps * depth * reduction)


def assert_close_normwise(actual, expected, rtol: float, err_msg: str = "", scale=None) -> None:
  """``|actual - expected| <= rtol * scale`` elementwise; ``scale`` defaults to max|expected|."""
  a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == b.shape, (err_msg, a.shape, b.shape)
  if scale is None:
    scale = float(np.max(np.abs(b))) if b.size else 0.0
  np.testing.assert_allclose(a, b, rtol=0.0, atol=rtol * scale, err_msg=err_msg)


def tree_scale(tree) -> float:
  """The largest magnitude in a pytree (or a dict of arrays)."""
  return max((float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree)), default=0.0)


def assert_trees_close_normwise(actual, expected, rtol: float) -> None:
  """Every leaf of two pytrees of one structure within ``rtol`` of the tree's scale."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  scale = tree_scale(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    assert_close_normwise(a, b, rtol, jax.tree_util.keystr(path), scale)


def assert_masks_agree_except_near_the_threshold(
  mask_a: dict, mask_b: dict, pruned_from: dict, rtol: float
) -> None:
  """Masks pruned from weights that two programs computed agree, except at near-ties.

  Args:
    mask_a, mask_b: name -> bool array, every leaf of the two masks.
    pruned_from: name -> the weights ``mask_b`` was pruned from (one program's);
      names missing here are not prunable and must agree exactly.
    rtol: the weights' normwise tolerance; a weight within it (of its array's
      scale) of the global magnitude threshold may fall on either side.
  """
  assert sorted(mask_a) == sorted(mask_b)
  kept = [np.abs(pruned_from[k])[np.asarray(mask_b[k])] for k in pruned_from]
  threshold = min(float(np.min(x)) for x in kept if x.size)
  for name in mask_a:
    a, b = np.asarray(mask_a[name]), np.asarray(mask_b[name])
    differ = a != b
    if name not in pruned_from:
      assert not differ.any(), f"{name}: a leaf that is not pruned differs"
      continue
    w = np.abs(np.asarray(pruned_from[name], np.float64))
    slack = rtol * float(np.max(w)) if w.size else 0.0
    far = differ & (np.abs(w - threshold) > slack)
    assert not far.any(), (
      f"{name}: {int(far.sum())} of {int(differ.sum())} differing mask entries are more than "
      f"{slack:.3g} from the threshold {threshold:.6g}"
    )


def count_near_ties(logits, atol: float) -> int:
  """Examples whose prediction may flip when every logit moves by up to ``atol``."""
  top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
  return int(np.sum(top2[..., 1] - top2[..., 0] <= 2.0 * atol))


def assert_accuracies_agree(acc_a: float, acc_b: float, logits, rtol: float) -> None:
  """Two programs' accuracies of one model on ``logits.shape[0]`` examples differ by
  no more than the examples whose top two logits are within ``rtol * max|logits|``."""
  logits = np.asarray(logits)
  n = logits.shape[0]
  ties = count_near_ties(logits, rtol * float(np.max(np.abs(logits))))
  flips = abs(round(acc_a * n) - round(acc_b * n))
  assert flips <= ties, f"accuracies {acc_a} and {acc_b} differ by {flips} examples of {n}"
