"""Evaluation of one model (loss, accuracy, class probabilities) inside jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from swamp_jax import data as data_lib


def pad_batches(images, labels, batch_size: int):
  """(images [k, batch_size, ...], labels [k, batch_size], bool weights [k, batch_size]):
  ``images`` [n, ...] in batches, the last one padded with zero rows of weight 0."""
  n = images.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
  weights = jnp.arange(num_batches * batch_size) < n
  shape = (num_batches, batch_size)
  return (
    images.reshape(*shape, *images.shape[1:]),
    labels.reshape(shape),
    weights.reshape(shape),
  )


def compute_probabilities(model, variables, images, mean, std, batch_size: int) -> jax.Array:
  """Softmax outputs [n, num_classes] of the model in inference mode."""
  labels = jnp.zeros((images.shape[0],), jnp.int32)
  xb, _, _ = pad_batches(images, labels, batch_size)

  def body(_, x):
    logits = model.apply(variables, data_lib.preprocess(x, mean, std), train=False)
    return None, jax.nn.softmax(logits.astype(jnp.float32))

  _, probs = jax.lax.scan(body, None, xb)
  return probs.reshape(-1, probs.shape[-1])[: images.shape[0]]


def compute_batch_sums(model, variables, images, labels, weights, mean, std) -> dict:
  """Summed cross-entropy and correct predictions of one batch, each example counted with
  its weight (0 for padding rows).

  Args:
    images: stored images [b, H, W, C]; labels int32 [b]; weights [b] (0 or 1).

  Returns:
    ``{'loss': scalar, 'accuracy': scalar}`` float32 sums (``compute_metrics`` divides them).
  """
  logits = model.apply(variables, data_lib.preprocess(images, mean, std), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = jnp.argmax(logits, -1) == labels
  return {"loss": jnp.sum(loss * weights), "accuracy": jnp.sum(correct * weights)}


def add_sums(totals: dict, sums: dict) -> dict:
  """``totals`` plus one batch's ``compute_batch_sums`` (in this order: batch after batch)."""
  return {k: totals[k] + sums[k] for k in totals}


def zero_sums() -> dict:
  return {"loss": jnp.float32(0), "accuracy": jnp.float32(0)}


def compute_metrics(model, variables, images, labels, mean, std, batch_size: int) -> dict:
  """Mean cross-entropy and accuracy of ``model`` on ``(images, labels)``.

  Args:
    model: a Flax module taking ``(x, train=False)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (no particle axis;
      vmap this function to evaluate every particle).
    images: stored images [n, H, W, C]; labels int32 [n].

  Returns:
    ``{'loss': scalar, 'accuracy': scalar}`` float32 arrays.
  """
  xb, yb, wb = pad_batches(images, labels, batch_size)

  def body(totals, batch):
    return add_sums(totals, compute_batch_sums(model, variables, *batch, mean, std)), None

  totals, _ = jax.lax.scan(body, zero_sums(), (xb, yb, wb))
  return divide_sums(totals, images.shape[0])


def divide_sums(totals: dict, num_examples: int) -> dict:
  """Means of ``num_examples`` examples from their sums."""
  return {k: v / num_examples for k, v in totals.items()}


def compute_ensemble_metrics(probabilities, labels) -> dict:
  """Loss and accuracy of the mean of members' softmax outputs.

  Args:
    probabilities: [num_members, n, num_classes].
    labels: int32 [n].
  """
  probs = jnp.mean(probabilities, axis=0)
  loss = -jnp.mean(jnp.log(jnp.take_along_axis(probs, labels[:, None], -1)[:, 0] + 1e-12))
  accuracy = jnp.mean(jnp.argmax(probs, -1) == labels)
  return {"loss": loss, "accuracy": accuracy}
