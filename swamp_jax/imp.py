"""Iterative magnitude pruning rounds, built from the pure pieces.

An IMP round of SWAMP is three jitted programs: ``start`` (rewind the ticket
under the mask into N particles), ``train`` (a scanned chunk of steps of
every particle; called once per epoch so the terminal can show progress),
and ``finish`` (SWA solutions -> average -> BatchNorm recompute ->
evaluation -> next mask). ``RoundPrograms`` holds them for one setting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from swamp_jax import averaging, batchnorm, evaluation, masking, particles

# Independent PRNG streams, folded into the seed's key.
INIT_STREAM, PRETRAIN_STREAM, ROUND_STREAM = 0, 1, 2
PRUNE_STREAM = 3  # the 'random' prune criterion's scores


class Ticket(NamedTuple):
  """The rewind point: weights and BatchNorm statistics at step T0."""

  params: Any
  batch_stats: Any


class EvalData(NamedTuple):
  """Splits to report on: stored images and int32 labels (validation may be empty); in
  device memory, or host arrays in a streamed run (``streamed_evaluation``)."""

  test_images: jax.Array
  test_labels: jax.Array
  validation_images: jax.Array
  validation_labels: jax.Array


class RecomputedStats(NamedTuple):
  """BatchNorm statistics recomputed outside ``finish`` (a streamed run's,
  ``streamed_batchnorm``), for ``finish_round`` to use as given."""

  average: Any  # the average's, no particle axis
  particles: Any  # each solution's [N, ...]; None where ``RoundSettings.recomputes`` says not


class RoundOutput(NamedTuple):
  """What ``finish`` returns (arrays; particle leaves have a leading axis)."""

  params: Any  # averaged weights w_bar
  batch_stats: Any  # their (recomputed) BatchNorm statistics
  next_mask: Any  # the mask pruned from w_bar
  metrics: dict  # name -> scalar, or [N] for per-particle metrics
  particle_params: Any  # each particle's solution (SWA mean or last weights), [N, ...]
  particle_batch_stats: Any  # their BatchNorm statistics, [N, ...]
  # The average's other statistics, reported beside the headline (running ones where those
  # are recomputed, and vice versa); None without BatchNorm or ``bn_recompute``.
  other_batch_stats: Any = None


# Raw uint32[2] keys (not typed key arrays): they checkpoint as plain arrays.
def particle_key(seed: int, round_index: int, particle: int) -> jax.Array:
  """The data-order key of ``particle`` in ``round_index``."""
  root = jax.random.fold_in(jax.random.PRNGKey(seed), ROUND_STREAM)
  return jax.random.fold_in(jax.random.fold_in(root, round_index), particle)


def prune_key(seed: int, round_index: int) -> jax.Array:
  """The key of the random scores that prune the mask at the end of ``round_index``."""
  root = jax.random.fold_in(jax.random.PRNGKey(seed), PRUNE_STREAM)
  return jax.random.fold_in(root, round_index)


def pretrain_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), PRETRAIN_STREAM)


def init_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), INIT_STREAM)


@dataclasses.dataclass(frozen=True)
class RoundSettings:
  """Static settings of ``finish``.

  BatchNorm statistics are recomputed (``bn_recompute``) for solutions that
  are averages of several weights: a particle's SWA mean of more than one
  snapshot, and the mean of several particles. A solution that averages
  nothing (IMP's last weights, or a one-snapshot SWA mean) keeps its own
  running statistics, as plain IMP does, unless ``bn_recompute_unaveraged``.
  """

  prune_fraction: float
  bn_recompute: bool
  bn_batch_size: int
  bn_num_batches: int
  eval_batch_size: int
  swa_snapshots: int = 0  # weights each particle's SWA mean averages (0: SWA off)
  bn_recompute_unaveraged: bool = False
  pruning_rule: masking.PruningRule = masking.PruningRule()
  # Training examples (rows past it pad a multi-process training set): the BN recompute
  # draws its batches from these only, so its statistics are the same on any process count.
  bn_num_examples: int = 0

  def recomputes(self, num_averaged: int) -> bool:
    """Whether BN statistics of a solution averaging ``num_averaged`` weights are recomputed."""
    return self.bn_recompute and (num_averaged > 1 or self.bn_recompute_unaveraged)

  def recomputes_average(self, num_particles: int) -> bool:
    """Whether the average of ``num_particles`` solutions gets recomputed statistics (it
    averages their SWA snapshots; SWA off: their last weights)."""
    return self.recomputes(num_particles * max(self.swa_snapshots, 1))

  def recomputes_particles(self) -> bool:
    """Whether each particle's solution gets recomputed statistics (``recomputes`` of the
    SWA snapshots it averages; SWA off: its last weights, one)."""
    return self.recomputes(max(self.swa_snapshots, 1))


def compute_round_average(states: particles.ParticleState, placement=None):
  """(each particle's solution [N, ...], their average, the mean of the particles'
  running BatchNorm statistics): what a round's end averages."""
  solutions = particles.compute_solutions(states, placement)
  avg_params = averaging.average_particles(solutions)
  return solutions, avg_params, averaging.average_particles(states.batch_stats)


def finish_round(
  states: particles.ParticleState,
  mask,
  data: particles.DeviceData,
  eval_data: EvalData,
  prune_key: jax.Array | None = None,
  recomputed: RecomputedStats | None = None,
  *,
  model,
  prunable,
  settings: RoundSettings,
  placement=None,
) -> RoundOutput:
  """Average the particles' solutions, fix BN, evaluate, prune from the average.

  The headline metrics (``average/*``, ``particles/*``) use recomputed
  BatchNorm statistics for averaged solutions and running ones otherwise
  (``RoundSettings.recomputes``). With BatchNorm and ``bn_recompute`` the
  average is also reported both ways (``average_running_bn/*``,
  ``average_recomputed_bn/*``), and ``bn/average_recomputed`` says which one
  the headline is. ``prune_key`` (``prune_key(seed, round)``) feeds a random
  prune criterion. Outputs other than the per-particle ones are replicated
  over the mesh.

  ``recomputed`` (a streamed run's, which has no training set in device
  memory: ``data.images`` is then empty) replaces the recompute pass over
  ``data.images``; it holds what that pass would give (``average``, and
  ``particles`` where ``settings.recomputes`` the particles' solutions).
  ``eval_data=None`` leaves the split metrics out (a streamed run evaluates
  its host-held splits batch by batch: ``streamed_evaluation``).
  """
  n = states.key.shape[0]
  lift = functools.partial(particles.lift_over_particles, num_particles=n, placement=placement)
  solutions, avg_params, running_bs = compute_round_average(states, placement)
  has_bn = bool(jax.tree_util.tree_leaves(running_bs))
  recompute_average = settings.recomputes_average(n)
  recompute = functools.partial(
    batchnorm.recompute_batch_stats,
    model,
    images=data.images,
    mean=data.mean,
    std=data.std,
    batch_size=settings.bn_batch_size,
    num_batches=settings.bn_num_batches,
    num_examples=settings.bn_num_examples,
  )
  if not settings.bn_recompute:
    recomputed_bs = running_bs
  elif recomputed is not None:
    recomputed_bs = recomputed.average
  else:
    recomputed_bs = recompute(avg_params, running_bs)
  avg_bs = recomputed_bs if recompute_average else running_bs
  particle_bs = states.batch_stats
  if settings.recomputes_particles():
    if recomputed is not None:
      particle_bs = recomputed.particles
    else:
      particle_bs = lift(recompute)(solutions, states.batch_stats)

  other_bs = None
  if settings.bn_recompute and has_bn:
    # BN after averaging is switchable, so the average is reported both ways, whichever
    # the headline is (evaluated once each).
    other_bs = running_bs if recompute_average else recomputed_bs
  metrics = {}
  if has_bn:
    metrics["bn/average_recomputed"] = jnp.asarray(recompute_average)
  evaluated = RoundOutput(avg_params, avg_bs, None, {}, solutions, particle_bs, other_bs)
  for split, images, labels in list_eval_splits(eval_data) if eval_data is not None else ():
    totals = compute_split_sums(
      evaluated,
      images,
      labels,
      data.mean,
      data.std,
      settings.eval_batch_size,
      model=model,
      placement=placement,
    )
    metrics.update(name_split_metrics(split, totals, images.shape[0], recompute_average))
  next_mask = masking.compute_mask(
    avg_params, mask, prunable, settings.prune_fraction, settings.pruning_rule, key=prune_key
  )
  out = evaluated._replace(next_mask=next_mask, metrics=metrics)
  if placement is not None:
    names = ("params", "batch_stats", "next_mask", "metrics", "other_batch_stats")
    replicated = [getattr(out, name) for name in names]
    replicated = jax.lax.with_sharding_constraint(replicated, placement.replicated)
    out = out._replace(**dict(zip(names, replicated, strict=True)))
  return out


def list_eval_splits(eval_data: EvalData) -> list:
  """[(split name, images, labels)]: 'test', and 'validation' where it has examples."""
  splits = [("test", eval_data.test_images, eval_data.test_labels)]
  if eval_data.validation_images.shape[0]:
    splits.append(("validation", eval_data.validation_images, eval_data.validation_labels))
  return splits


def add_evaluation_sums(
  totals, out: RoundOutput, images, labels, weights, mean, std, *, model, placement=None
):
  """``totals`` plus one evaluation batch's loss and correct-prediction sums of the average
  (with its headline statistics, and its other ones where ``out.other_batch_stats``) and of
  each particle's solution (lifted over the particle axis).

  Args:
    totals: {'headline', 'other', 'particles'} -> {'loss', 'accuracy'} float32 sums,
      scalars ([N] for 'particles'); 'other' only where ``out.other_batch_stats``.
    out: the models (``RoundOutput``'s params and statistics; other fields unused).
    images: stored images [b, H, W, C]; labels int32 [b]; weights [b] (0: padding).
  """
  n = jax.tree_util.tree_leaves(out.particle_params)[0].shape[0]

  def sums(params, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}
    return evaluation.compute_batch_sums(model, variables, images, labels, weights, mean, std)

  new = {
    "headline": sums(out.params, out.batch_stats),
    "particles": particles.lift_over_particles(sums, n, placement)(
      out.particle_params, out.particle_batch_stats
    ),
  }
  if out.other_batch_stats is not None:
    new["other"] = sums(out.params, out.other_batch_stats)
  return {k: evaluation.add_sums(totals[k], new[k]) for k in totals}


def create_evaluation_sums(out: RoundOutput) -> dict:
  """Zero ``add_evaluation_sums`` totals for the models of ``out``."""
  n = jax.tree_util.tree_leaves(out.particle_params)[0].shape[0]
  totals = {"headline": evaluation.zero_sums()}
  totals["particles"] = {k: jnp.zeros((n,), jnp.float32) for k in totals["headline"]}
  if out.other_batch_stats is not None:
    totals["other"] = evaluation.zero_sums()
  return totals


def compute_split_sums(
  out: RoundOutput, images, labels, mean, std, batch_size: int, *, model, placement=None
):
  """``add_evaluation_sums`` over a whole split in device memory (images [n, H, W, C]),
  batch after batch in one compiled loop."""
  xb, yb, wb = evaluation.pad_batches(images, labels, batch_size)
  add = functools.partial(
    add_evaluation_sums, out=out, mean=mean, std=std, model=model, placement=placement
  )

  def body(totals, batch):
    return add(totals, images=batch[0], labels=batch[1], weights=batch[2]), None

  totals, _ = jax.lax.scan(body, create_evaluation_sums(out), (xb, yb, wb))
  return totals


def name_split_metrics(split: str, totals: dict, num_examples: int, recompute_average) -> dict:
  """``finish``'s metrics of one split from its ``add_evaluation_sums`` totals:
  ``average/{split}_*``, ``particles/{split}_*`` ([N]), and with the other statistics
  ``average_{recomputed,running}_bn/{split}_*``."""
  means = {k: evaluation.divide_sums(v, num_examples) for k, v in totals.items()}
  metrics = {f"average/{split}_{name}": v for name, v in means["headline"].items()}
  metrics.update({f"particles/{split}_{name}": v for name, v in means["particles"].items()})
  if "other" in means:
    both = {"recomputed": means["headline"], "running": means["other"]}
    if not recompute_average:
      both = {"recomputed": means["other"], "running": means["headline"]}
    for kind, values in both.items():
      for name, value in values.items():
        metrics[f"average_{kind}_bn/{split}_{name}"] = value
  return metrics


@dataclasses.dataclass(frozen=True)
class RoundPrograms:
  """The jitted programs of a round, for one model, optimizer and step spec."""

  start: Callable
  train: Callable
  finish: Callable


def create_round_programs(
  model, tx, spec: particles.StepSpec, prunable, settings: RoundSettings, placement=None
) -> RoundPrograms:
  """Jits ``start``/``train``/``finish``; particle states are donated to ``train``.

  With a ``distributed.Placement``, particles are split over its mesh's
  'particle' axis and each particle's batch over its 'data' axis.
  """
  start = jax.jit(functools.partial(particles.create_particles, tx=tx, placement=placement))
  train = jax.jit(
    functools.partial(particles.train_steps, model=model, tx=tx, spec=spec, placement=placement),
    static_argnames=("num_steps",),
    donate_argnums=(0,),
  )
  finish = jax.jit(
    functools.partial(
      finish_round, model=model, prunable=prunable, settings=settings, placement=placement
    )
  )
  return RoundPrograms(start, train, finish)


def compute_chunks(
  phase_start: int, start_step: int, end_step: int, steps_per_call: int, checkpoint_every: int = 0
):
  """(start, num_steps) pieces of [start_step, end_step), each one compiled call.

  Pieces end every ``steps_per_call`` steps counted from ``phase_start`` and
  at multiples of ``checkpoint_every`` (> 0) global steps, where checkpoints
  are taken. They depend only on these numbers, not on where a run resumed,
  so a run resumed at a piece boundary runs the same compiled programs on
  the same pieces as an uninterrupted one (bit-identical results).
  """
  step = start_step
  while step < end_step:
    stop = min(
      end_step, phase_start + ((step - phase_start) // steps_per_call + 1) * steps_per_call
    )
    if checkpoint_every > 0:
      stop = min(stop, (step // checkpoint_every + 1) * checkpoint_every)
    yield step, stop - step
    step = stop


def as_step(value) -> jax.Array:
  return jnp.asarray(value, jnp.int32)
