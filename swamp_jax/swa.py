"""Stochastic weight averaging: a uniform running mean of one particle's weights."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SWAState(NamedTuple):
  """Running mean of the weights collected so far.

  ``mean`` has the structure of the params; ``count`` is an int32 scalar
  (per particle, once lifted).
  """

  mean: object
  count: jax.Array


def init_swa(params) -> SWAState:
  return SWAState(jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))


def update_swa(state: SWAState, params, collect) -> SWAState:
  """Adds ``params`` to the running mean where ``collect`` (a traced bool) holds."""
  count = state.count + 1
  mean = jax.tree_util.tree_map(
    lambda m, p: jnp.where(collect, m + (p - m) / count.astype(m.dtype), m), state.mean, params
  )
  return SWAState(mean, jnp.where(collect, count, state.count))


def should_collect(step, swa_start_step: int, swa_every_steps: int):
  """Whether the weights after global step ``step`` (0-based) enter the mean.

  Collected after steps swa_start + every, swa_start + 2 * every, ...
  (counted as the number of steps completed), never at ``swa_start_step``
  itself: there the schedule has only just reached the SWA rate, and the
  SWA recipe averages the weights at the *ends* of the SWA-phase epochs. With
  epoch-aligned values, a round of E epochs whose SWA phase starts after
  epoch s collects the ends of epochs s + every, s + 2 * every, ..., that is
  (E - s) // every snapshots, the last one the end of the round when
  ``every`` divides E - s (e.g. E=200, s=150, every=1: epochs 151..200, 50).
  """
  done = step + 1
  return (done > swa_start_step) & ((done - swa_start_step) % swa_every_steps == 0)


def compute_swa_solution(state: SWAState, params):
  """The SWA weights, or ``params`` when nothing was collected (SWA off)."""
  return jax.tree_util.tree_map(lambda m, p: jnp.where(state.count > 0, m, p), state.mean, params)
