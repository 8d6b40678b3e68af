"""Weight-space averaging of particles."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def average_particles(stacked):
  """Uniform mean over the leading particle axis of every leaf.

  Args:
    stacked: pytree whose leaves are [num_particles, ...].

  Returns:
    The pytree of means, leaves [...], dtype kept. Under jit with the
    particle axis sharded over devices this is one collective.
  """
  return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), stacked)


def interpolate(params_a, params_b, alpha):
  """``(1 - alpha) * a + alpha * b`` leafwise (the line between two solutions)."""
  return jax.tree_util.tree_map(lambda a, b: (1 - alpha) * a + alpha * b, params_a, params_b)
