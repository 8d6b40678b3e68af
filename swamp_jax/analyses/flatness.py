"""Flatness of a solution: the Hessian trace of its training loss (Hutchinson's estimator).

The paper's claim 4: SWAMP solutions are flatter (lower Hessian trace) than
IMP's. ``tr(H) = E[v^T H v]`` for probes v with independent Rademacher (+-1)
entries; each ``H v`` is a forward-over-reverse product (``jax.jvp`` of
``jax.grad``), never the Hessian itself.

Only unpruned weights count: probes are multiplied by the mask, which gives
the trace of the Hessian restricted to the surviving coordinates (the
sub-matrix ``H[S, S]``, whose trace is the sum of ``H_ii`` over kept i).
Pass ``mask & prunable`` to count the prunable kernels alone.

The loss is the mean cross-entropy over a fixed set of training batches in
*inference* mode, with the solution's own BatchNorm statistics. Train mode
would make each example's output depend on the whole batch through the
batch statistics, i.e. differentiate a different function from the one that
is evaluated and deployed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swamp_jax import data as data_lib
from swamp_jax import masking, saved_runs
from swamp_jax import workdir as workdir_lib

_BATCH_ORDER_SEED = 0


class HessianTrace(NamedTuple):
  """Hutchinson's estimate: ``mean`` and ``stderr`` of the per-probe ``estimates`` [P]."""

  mean: jax.Array
  stderr: jax.Array  # std (ddof=1) / sqrt(P); NaN for a single probe
  estimates: jax.Array


def create_rademacher_probe(key, params, mask=None):
  """A pytree like ``params`` of independent +-1 entries, zero where ``mask`` is False."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  probe = [
    jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x))
    for k, x in zip(keys, leaves, strict=True)
  ]
  probe = jax.tree_util.tree_unflatten(treedef, probe)
  if mask is None:
    return probe
  return jax.tree_util.tree_map(lambda v, m: v * m.astype(v.dtype), probe, mask)


def compute_hessian_vector_product(loss_fn: Callable, params, vector):
  """``H v`` of scalar ``loss_fn`` at ``params`` (forward-over-reverse, like ``vector``)."""
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _estimate_trace(loss_fn: Callable, params, mask, keys) -> HessianTrace:
  def one(k):
    v = create_rademacher_probe(k, params, mask)
    hv = compute_hessian_vector_product(loss_fn, params, v)
    terms = jax.tree_util.tree_map(lambda a, b: jnp.sum(a * b, dtype=jnp.float32), v, hv)
    return sum(jax.tree_util.tree_leaves(terms))

  estimates = jax.lax.map(one, keys)
  stderr = jnp.std(estimates, ddof=1) / jnp.sqrt(jnp.float32(keys.shape[0]))
  return HessianTrace(jnp.mean(estimates), stderr, estimates)


def compute_hessian_trace(
  loss_fn: Callable, params, mask, key, num_probes: int = 20
) -> HessianTrace:
  """Hutchinson estimate of ``tr(H[S, S])``, S the coordinates ``mask`` keeps.

  Args:
    loss_fn: params -> scalar loss (jittable; compiled anew for each call,
      see ``compute_training_hessian_trace`` for a cached one).
    params: where the Hessian is taken; no particle axis.
    mask: bool pytree like ``params``, or None for every coordinate.
    key: PRNG key of the probes.
    num_probes: P, Rademacher probes (evaluated one after another).

  Returns:
    A ``HessianTrace``. For a diagonal Hessian every probe gives the exact
    trace (``v_i^2 = 1``), so ``stderr`` is 0.
  """
  estimate = jax.jit(functools.partial(_estimate_trace, loss_fn))
  return estimate(params, mask, jax.random.split(key, num_probes))


def create_training_batches(images, labels, batch_size: int, num_batches: int):
  """A fixed set of training batches: ([B, b, H, W, C] stored images, int32 [B, b] labels).

  The first ``num_batches`` (<= 0: all full ones) batches of a seed-0
  permutation of the examples, the same for every run and model, so traces
  of different solutions are taken on the same data.
  """
  n = len(labels)
  available = n // batch_size
  num_batches = available if num_batches <= 0 else min(num_batches, available)
  if num_batches < 1:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
  order = np.random.default_rng(_BATCH_ORDER_SEED).permutation(n)[: num_batches * batch_size]
  order = order.reshape(num_batches, batch_size)
  return jnp.asarray(np.asarray(images)[order]), jnp.asarray(np.asarray(labels)[order])


def compute_training_loss(model, params, batch_stats, images, labels, mean, std):
  """Mean inference-mode cross-entropy over batches ``images`` [B, b, ...], ``labels`` [B, b].

  ``batch_stats`` (the solution's BN statistics) is held fixed.
  """

  def body(total, batch):
    x, y = batch
    logits = model.apply(
      {"params": params, "batch_stats": batch_stats},
      data_lib.preprocess(x, mean, std),
      train=False,
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return total + jnp.mean(loss), None

  total, _ = jax.lax.scan(body, jnp.float32(0), (images, labels))
  return total / images.shape[0]


@functools.partial(jax.jit, static_argnames=("model", "num_probes"))
def compute_training_hessian_trace(
  model, params, batch_stats, mask, images, labels, mean, std, key, num_probes: int = 20
) -> HessianTrace:
  """``compute_hessian_trace`` of ``compute_training_loss`` at ``params``.

  Compiled once per model and shapes, so solutions of many rounds and runs
  are compared without recompiling.

  Args:
    params, batch_stats: the solution, no particle axis.
    mask: bool pytree like ``params``, or None.
    images, labels: from ``create_training_batches``.
    mean, std: per-channel [C] normalization.
    key: PRNG key of the probes.
  """
  loss_fn = functools.partial(
    compute_training_loss,
    model,
    batch_stats=batch_stats,
    images=images,
    labels=labels,
    mean=mean,
    std=std,
  )
  return _estimate_trace(loss_fn, params, mask, jax.random.split(key, num_probes))


def compute_round_hessian_trace(
  workdir: str,
  round_index: int,
  particle: int | None = None,
  num_probes: int = 20,
  num_batches: int = 10,
  batch_size: int | None = None,
  seed: int = 0,
  prunable_only: bool = False,
  dataset=None,
) -> dict:
  """Hessian trace of a saved round's averaged model (or one particle's solution).

  Args:
    particle: None for the averaged model, else the particle's index.
    num_batches, batch_size: the fixed training batches (batch_size None:
      the run's ``batch_size``).
    seed: the probes' PRNG seed.
    prunable_only: count only the surviving prunable kernels (not biases
      and norm parameters).
    dataset: the ``Dataset`` of a run trained on in-memory arrays.

  Returns:
    ``{'trace': float, 'stderr': float, 'num_probes': int}``.
  """
  run = saved_runs.load_run(workdir, dataset)
  saved = workdir_lib.load_round_model(workdir, round_index)
  params, batch_stats, mask = saved["params"], saved["batch_stats"], saved["mask"]
  if particle is not None:
    take = lambda tree: jax.tree_util.tree_map(lambda x: x[particle], tree)  # noqa: E731
    params, batch_stats = take(saved["particle_params"]), take(saved["particle_batch_stats"])
  if prunable_only:
    config = run.config
    prunable = masking.compute_prunable(params, config.prune_exclude, config.prune_leaves)
    mask = jax.tree_util.tree_map(lambda m, p: np.logical_and(m, p), mask, prunable)
  images, labels = create_training_batches(
    run.dataset.train_images,
    run.dataset.train_labels,
    batch_size or run.config.batch_size,
    num_batches,
  )
  out = compute_training_hessian_trace(
    run.model,
    params,
    batch_stats,
    mask,
    images,
    labels,
    jnp.asarray(run.dataset.mean),
    jnp.asarray(run.dataset.std),
    jax.random.key(seed),
    num_probes,
  )
  return {"trace": float(out.mean), "stderr": float(out.stderr), "num_probes": num_probes}
