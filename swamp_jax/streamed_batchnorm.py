"""The BatchNorm recompute pass of a streamed run, its batches read through the host.

``imp.finish_round`` recomputes BatchNorm statistics (``batchnorm``) from the
training set in device memory, which a streamed run does not have. Here the
same rows in the same order (``batchnorm.compute_recompute_order``) are read
from the training source one batch at a time, as evaluation sees them (images
of variable size through ``augmentation.resize_and_center_crop``), and each
batch is added by one jitted program to the sums of the average's statistics
and, where ``RoundSettings.recomputes_particles``, of every particle's
solution: ``batchnorm.add_batch_statistics`` written for one model, lifted
over the particle axis by ``particles.lift_over_particles`` as ``finish`` lifts
its recompute. Device memory holds one batch at a time. ``finish`` then takes
the statistics as given (``imp.RecomputedStats``).

The arithmetic is the in-device pass's (per batch: preprocess, train-mode
statistics at momentum 0, add to the running sum; then the sum over the batch
count), in separate programs instead of one scan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import batchnorm, imp, particles, streamed_data, streaming

_BATCHES_AHEAD = 2  # batches grain reads ahead of the device (bounded host memory)


def accumulate_batch_statistics(
  totals: imp.RecomputedStats,
  avg_params,
  avg_batch_stats,
  solutions,
  particle_batch_stats,
  images,
  mean,
  std,
  *,
  model,
  placement=None,
) -> imp.RecomputedStats:
  """``totals`` plus one batch's BatchNorm statistics of the average and of each solution.

  Args:
    totals: running sums; ``totals.particles`` [N, ...] or None (not recomputed).
    avg_params, avg_batch_stats: the average (no particle axis) and its running
      statistics (structure only: every BatchNorm runs at momentum 0).
    solutions, particle_batch_stats: each particle's solution and statistics [N, ...].
    images: one batch of stored images [b, H, W, C], shared by every model.

  Returns:
    The new sums, of ``totals``'s structure.
  """
  add = functools.partial(batchnorm.add_batch_statistics, model)
  average = add(avg_params, avg_batch_stats, totals.average, images, mean, std)
  per_particle = totals.particles
  if per_particle is not None:
    n = jax.tree_util.tree_leaves(solutions)[0].shape[0]
    lifted = particles.lift_over_particles(add, n, placement, in_axes=(0, 0, 0, None, None, None))
    per_particle = lifted(solutions, particle_batch_stats, per_particle, images, mean, std)
    per_particle = particles.constrain_particles(per_particle, n, placement)
  return imp.RecomputedStats(average, per_particle)


def _start_sums(states: particles.ParticleState, with_particles: bool, placement=None):
  """(average, its running statistics, solutions, zero sums) of a round's particles."""
  solutions, avg_params, running_bs = imp.compute_round_average(states, placement)
  zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
  totals = imp.RecomputedStats(
    zeros(running_bs), zeros(states.batch_stats) if with_particles else None
  )
  return avg_params, running_bs, solutions, totals


@dataclasses.dataclass(frozen=True)
class RecomputeReader:
  """The grain map of one recompute batch: rows int [b] -> stored images [b, H, W, C],
  as evaluation sees them (``streamed_data.read_eval_images``)."""

  source: Any
  transform: str = "none"

  def __call__(self, rows):
    return streamed_data.read_eval_images(self.source, np.asarray(rows), self.transform)[0]


def iterate_recompute_batches(source, order, transform: str = "none", worker_count: int = 0):
  """Host images of each row of ``order`` (int [batches, k]), in order, read ahead by grain
  (``worker_count`` processes; 0: threads of this process). Yields uint8 [k, H, W, C]."""
  import grain

  ds = grain.MapDataset.source(np.ascontiguousarray(order)).map(RecomputeReader(source, transform))
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=_BATCHES_AHEAD, prefetch_buffer_size=_BATCHES_AHEAD)
  )
  yield from streaming.iterate_in_workers(ds, worker_count)


@dataclasses.dataclass(frozen=True)
class StreamedRecompute:
  """A streamed run's recompute pass: ``__call__(states, mean, std)`` -> ``imp.RecomputedStats``
  (None where ``settings`` recomputes nothing), reading ``settings``' recompute batches
  from ``source`` (the training rows, ``len(source) == settings.bn_num_examples``)."""

  source: Any
  transform: str
  settings: imp.RoundSettings
  worker_count: int
  placement: Any
  start: Any  # jitted _start_sums
  accumulate: Any  # jitted accumulate_batch_statistics, sums donated

  def compute_order(self) -> np.ndarray:
    """The rows of every recompute batch, int64 [batches, batch_size] (the in-device pass's)."""
    s = self.settings
    n = s.bn_num_examples if s.bn_num_examples > 0 else len(self.source)
    return np.asarray(batchnorm.compute_recompute_order(n, s.bn_batch_size, s.bn_num_batches))

  def _put(self, images):
    if self.placement is None:
      return jax.device_put(images)
    sharding = self.placement.batch  # rows over 'data', like the steps' batches
    shape = (self.settings.bn_batch_size, *images.shape[1:])
    return jax.make_array_from_process_local_data(sharding, images, shape)

  def __call__(self, states, mean, std) -> imp.RecomputedStats | None:
    if not (self.settings.bn_recompute and jax.tree_util.tree_leaves(states.batch_stats)):
      return None
    order = self.compute_order()
    if self.placement is not None:  # this process reads only the rows its devices hold
      (rows,) = streaming.compute_process_block(self.placement.batch, order.shape[1:])
      order = order[:, rows]
    avg_params, avg_bs, solutions, totals = self.start(states)
    for images in iterate_recompute_batches(self.source, order, self.transform, self.worker_count):
      totals = self.accumulate(
        totals, avg_params, avg_bs, solutions, states.batch_stats, self._put(images), mean, std
      )
    return imp.RecomputedStats(
      *(None if t is None else batchnorm.compute_mean_statistics(t, order.shape[0]) for t in totals)
    )


def create_streamed_recompute(
  source, transform: str, model, settings: imp.RoundSettings, worker_count: int = 0, placement=None
) -> StreamedRecompute:
  """A ``StreamedRecompute`` over the training ``source`` with its programs jitted."""
  start = jax.jit(
    functools.partial(
      _start_sums, with_particles=settings.recomputes_particles(), placement=placement
    )
  )
  accumulate = jax.jit(
    functools.partial(accumulate_batch_statistics, model=model, placement=placement),
    donate_argnums=(0,),
  )
  return StreamedRecompute(source, transform, settings, worker_count, placement, start, accumulate)


@dataclasses.dataclass(frozen=True)
class StreamedFinish:
  """``RoundPrograms.finish`` of a streamed run: the recompute pass through the host, the
  jitted ``finish`` with its statistics, and, with ``evaluate``
  (``streamed_evaluation.HostEvaluation``), the evaluation sets read from host memory
  batch by batch instead of inside ``finish``. Called as the in-device ``finish``."""

  finish: Any
  recompute: StreamedRecompute
  evaluate: Any = None

  def __call__(self, states, mask, data, eval_data, prune_key=None) -> imp.RoundOutput:
    recomputed = self.recompute(states, data.mean, data.std)
    if self.evaluate is None:
      return self.finish(states, mask, data, eval_data, prune_key, recomputed)
    out = self.finish(states, mask, data, None, prune_key, recomputed)
    return out._replace(
      metrics={**out.metrics, **self.evaluate(out, eval_data, data.mean, data.std)}
    )


def with_streamed_recompute(
  programs: imp.RoundPrograms, recompute: StreamedRecompute, evaluate=None
) -> imp.RoundPrograms:
  """``programs`` whose ``finish`` recomputes BatchNorm statistics through ``recompute``
  (and evaluates through ``evaluate`` where given)."""
  return dataclasses.replace(programs, finish=StreamedFinish(programs.finish, recompute, evaluate))
