"""Evaluation of one model (loss, accuracy, class probabilities) inside jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from swamp_jax import data as data_lib


def _padded_batches(images, labels, batch_size: int):
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
  xb, _, _ = _padded_batches(images, labels, batch_size)

  def body(_, x):
    logits = model.apply(variables, data_lib.preprocess(x, mean, std), train=False)
    return None, jax.nn.softmax(logits.astype(jnp.float32))

  _, probs = jax.lax.scan(body, None, xb)
  return probs.reshape(-1, probs.shape[-1])[: images.shape[0]]


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
  xb, yb, wb = _padded_batches(images, labels, batch_size)

  def body(totals, batch):
    x, y, w = batch
    logits = model.apply(variables, data_lib.preprocess(x, mean, std), train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    correct = jnp.argmax(logits, -1) == y
    return (totals[0] + jnp.sum(loss * w), totals[1] + jnp.sum(correct * w)), None

  (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (xb, yb, wb))
  n = images.shape[0]
  return {"loss": loss / n, "accuracy": correct / n}


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
