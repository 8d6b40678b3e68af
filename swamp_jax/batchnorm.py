"""Recomputing BatchNorm statistics for averaged weights.

Averaged weights need statistics of their own: neither any particle's
running statistics nor their mean describe the activations of the average.
As in SWA's ``update_bn``: reset, then one train-mode pass over training
batches, the statistic being the plain mean of per-batch statistics.

Any model's BatchNorm layers qualify, whatever their momentum: each train-mode
call runs every ``flax.linen.BatchNorm`` (``nn.intercept_methods``) or
``nnx.BatchNorm`` (``models.NnxModel``) at momentum 0, so its new running
statistics are exactly that batch's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from swamp_jax import data as data_lib

_BN_ORDER_SEED = 0


def recompute_batch_stats(
  model,
  params,
  batch_stats,
  images,
  mean,
  std,
  batch_size: int,
  num_batches: int,
  num_examples: int = 0,
):
  """Fresh BatchNorm statistics of ``params`` from training batches.

  Args:
    model: the model (``models.as_functional`` form); its BatchNorm layers
      may have any momentum (``compute_batch_statistics``).
    params: weights without particle axis (vmap for several).
    batch_stats: current statistics; only their structure is used. An empty
      collection (a model without BatchNorm) is returned unchanged.
    images: stored training images [n, H, W, C] (no augmentation: the pass
      is deterministic and sees the data as evaluation does).
    num_batches: batches of a fixed order; ``<= 0`` means a whole epoch.
    num_examples: batches are drawn from rows ``[0, num_examples)`` only
      (``<= 0``: all rows). A training set split over several processes is
      padded to a multiple of the devices; its padding rows are not data.

  Returns:
    The new ``batch_stats`` pytree.
  """
  if not jax.tree_util.tree_leaves(batch_stats):
    return batch_stats
  images = jnp.asarray(images)  # host arrays cannot be indexed by traced indices
  n = num_examples if num_examples > 0 else images.shape[0]
  order = compute_recompute_order(n, batch_size, num_batches)

  def body(total, idx):
    return add_batch_statistics(model, params, batch_stats, total, images[idx], mean, std), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
  total, _ = jax.lax.scan(body, zeros, order)
  return compute_mean_statistics(total, order.shape[0])


def compute_recompute_order(num_examples: int, batch_size: int, num_batches: int) -> jax.Array:
  """The rows the recompute pass reads, batch by batch: int32 [batches, batch_size].

  A fixed permutation (key ``_BN_ORDER_SEED``) of rows ``[0, num_examples)``, cut into
  ``num_batches`` full batches (``<= 0``, or more than fit: one epoch's). The in-device
  pass and the streamed one (``streamed_batchnorm``) read these, in this order.
  """
  available = num_examples // batch_size
  num_batches = available if num_batches <= 0 else min(num_batches, available)
  order = jax.random.permutation(jax.random.key(_BN_ORDER_SEED), num_examples)
  return order[: num_batches * batch_size].reshape(num_batches, batch_size)


def add_batch_statistics(model, params, batch_stats, total, images, mean, std):
  """``total`` plus the BatchNorm statistics of one batch of stored images [b, H, W, C]
  (``compute_batch_statistics`` after ``data.preprocess``); one model, no particle axis.

  Returns:
    A pytree of ``batch_stats``'s structure.
  """
  x = data_lib.preprocess(images, mean, std)
  new = compute_batch_statistics(model, {"params": params, "batch_stats": batch_stats}, x)
  return jax.tree_util.tree_map(jnp.add, total, new)


def compute_mean_statistics(total, num_batches: int):
  """The recomputed statistics: the sum of ``num_batches`` batches' statistics over their count."""
  return jax.tree_util.tree_map(lambda t: t / num_batches, total)


def _at_momentum_zero(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
    # The bound module is this apply's own copy: its momentum is read inside __call__
    # (running = momentum * old + (1 - momentum) * batch), so 0 leaves exactly the batch's.
    saved = context.module.momentum
    object.__setattr__(context.module, "momentum", 0.0)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(context.module, "momentum", saved)
  return next_fun(*args, **kwargs)


def compute_batch_statistics(model, variables, x):
  """The BatchNorm statistics of batch ``x`` alone: a train-mode call with every
  BatchNorm at momentum 0, whatever momentum the model gave it.

  Args:
    model: a flax.linen.Module or a ``models.NnxModel``.
    variables: ``{'params': ..., 'batch_stats': ...}`` without particle axis.
    x: a preprocessed batch [b, ...].

  Returns:
    The ``batch_stats`` pytree of ``x``'s statistics.
  """
  if hasattr(model, "compute_batch_statistics"):
    return model.compute_batch_statistics(variables, x)
  with nn.intercept_methods(_at_momentum_zero):
    _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  return new["batch_stats"]
