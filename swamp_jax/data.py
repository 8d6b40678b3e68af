"""Per-particle batches drawn inside jit from a training set held in device memory.

The arrays come from ``datasets.Dataset`` (your arrays, TFDS, or the embedded
digits). Training never runs a Python input loop: the whole (small) training set sits
on the device in its stored dtype, and each particle's batch for a step is a
gather of indices from that particle's own permutation of the epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def compute_channel_sums(images: np.ndarray) -> np.ndarray:
  """[3, C] float64: sum, sum of squares and count over every axis but the last (the
  channels of images [n, H, W, C], the features of [n, F]), to combine shards."""
  x = images.reshape(-1, images.shape[-1]).astype(np.float64)
  return np.stack([x.sum(0), (x * x).sum(0), np.full(x.shape[-1], x.shape[0], np.float64)])


def compute_channel_stats(total: np.ndarray, sq_total: np.ndarray, count: np.ndarray):
  """Per-channel float32 (mean, std) from ``compute_channel_sums`` rows."""
  mean = total / count
  std = np.sqrt(np.maximum(sq_total / count - mean * mean, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def compute_epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The order in which one particle visits the training set in ``epoch``.

  A pure function of (key, epoch): resuming at any step re-derives it.
  Returns int32 [num_examples].
  """
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def compute_batch_indices(permutation: jax.Array, step_in_epoch, batch_size: int) -> jax.Array:
  """Indices [batch_size] of batch ``step_in_epoch`` of an epoch's permutation."""
  return jax.lax.dynamic_slice_in_dim(permutation, step_in_epoch * batch_size, batch_size)


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Stored inputs [b, ..., C] -> float32 normalized over the last axis."""
  return (images.astype(jnp.float32) - mean) / std


def augment(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Random crop (zero pad by ``padding``) and horizontal flip, per example.

  Args:
    key: PRNG key for this batch.
    images: float32 [b, H, W, C], already normalized (so zero padding is the
      mean, as in the usual recipe applied after normalization).

  Returns:
    float32 [b, H, W, C].
  """
  b, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)
