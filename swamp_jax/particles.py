"""Particles: copies of one sparse ticket, each trained with its own data order.

Everything here is written for ONE particle. ``lift_over_particles`` is the
single place where it is lifted over the leading particle axis (``jax.vmap``
with ``spmd_axis_name``, so that under a device mesh the particle axis is
partitioned over the mesh's particle axis and any sharding constraint inside
names only the per-particle axes). Arguments named ``placement`` take a
``distributed.Placement`` (None: no mesh, plain single-device code).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from swamp_jax import data as data_lib
from swamp_jax import masking, swa

PARTICLE_AXIS = "particle"
_AUGMENT_STREAM = 0x7FFFFFFF


class DeviceData(NamedTuple):
  """The training set in device memory: stored images [n, H, W, C], int32
  labels [n], per-channel float32 mean and std [C]."""

  images: jax.Array
  labels: jax.Array
  mean: jax.Array
  std: jax.Array


class ParticleState(NamedTuple):
  """One particle (leaves gain a leading [num_particles] axis once lifted).

  ``key`` drives this particle's data order and augmentation; everything
  else a step needs is a pure function of (state, global step).
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  swa: swa.SWAState
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static facts a training step needs."""

  batch_size: int
  num_examples: int
  augment: str  # datasets.AUGMENTATIONS: 'none' or 'crop_flip'
  swa_start_step: int  # global step; >= the end of the round when SWA is off
  swa_every_steps: int

  @property
  def steps_per_epoch(self) -> int:
    return data_lib.steps_per_epoch(self.num_examples, self.batch_size)


def lift_over_particles(fn, num_particles: int, placement=None, in_axes=0, out_axes=0):
  """The one place where per-particle code is lifted over the particle axis.

  ``jax.vmap`` over the leading axis. With a ``distributed.Placement`` whose
  particle axis divides ``num_particles``, the particle axis is partitioned
  over the mesh's 'particle' axis (``spmd_axis_name``), so sharding
  constraints written for one particle gain it automatically.
  """
  spmd = None
  if placement is not None and placement.particles(num_particles).spec != P():
    spmd = PARTICLE_AXIS
  return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, spmd_axis_name=spmd)


def constrain_particles(tree, num_particles: int, placement=None):
  """Pins stacked particle leaves to their mesh sharding (identity without a mesh)."""
  if placement is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, placement.particles(num_particles))


def create_particle(params, batch_stats, mask, key, tx) -> ParticleState:
  """A particle at the ticket: masked weights, fresh optimizer and SWA state."""
  params = masking.apply_mask(params, mask)
  return ParticleState(params, batch_stats, tx.init(params), swa.init_swa(params), key)


def compute_loss(model, params, batch_stats, images, labels):
  """Train-mode cross-entropy; returns (loss, new batch_stats)."""
  logits, new_vars = model.apply(
    {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(loss), new_vars.get("batch_stats", batch_stats)


def train_step(
  state: ParticleState,
  step,
  permutation,
  mask,
  data: DeviceData,
  *,
  model,
  tx,
  spec: StepSpec,
  placement=None,
):
  """One SGD step of one particle at global step ``step``, its batch gathered on device.

  Args:
    state: this particle's state.
    step: global step (int32 scalar), shared by all particles.
    permutation: this particle's order of the training set for this epoch.
    mask: the shared mask (no particle axis).
    data: the training set on device.
    placement: with a mesh, the batch is split over its 'data' axis.

  Returns:
    (new state, loss of the batch before the update).
  """
  idx = data_lib.compute_batch_indices(permutation, step % spec.steps_per_epoch, spec.batch_size)
  if placement is not None:
    idx = jax.lax.with_sharding_constraint(idx, placement.batch)
  return train_step_on_batch(
    state,
    step,
    data.images[idx],
    data.labels[idx],
    mask,
    data.mean,
    data.std,
    model=model,
    tx=tx,
    spec=spec,
  )


def train_step_on_batch(
  state: ParticleState, step, images, labels, mask, mean, std, *, model, tx, spec: StepSpec
):
  """One SGD step of one particle on a given batch (stored images [b, H, W, C], int32
  labels [b]): the step of ``train_step`` once its batch is gathered, and of a streamed
  run (``streaming``) whose batches come from the host.

  Returns:
    (new state, loss of the batch before the update).
  """
  images = data_lib.preprocess(images, mean, std)
  if spec.augment == "crop_flip":
    # A stream apart from the permutations' fold_in(key, epoch).
    aug_key = jax.random.fold_in(jax.random.fold_in(state.key, _AUGMENT_STREAM), step)
    images = data_lib.augment(aug_key, images)
  (loss, batch_stats), grads = jax.value_and_grad(
    lambda p: compute_loss(model, p, state.batch_stats, images, labels), has_aux=True
  )(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, mask=mask)
  params = masking.apply_mask(optax.apply_updates(state.params, updates), mask)
  collect = swa.should_collect(step, spec.swa_start_step, spec.swa_every_steps)
  new_swa = swa.update_swa(state.swa, params, collect)
  return ParticleState(params, batch_stats, opt_state, new_swa, state.key), loss


def train_steps(
  states: ParticleState,
  mask,
  data: DeviceData,
  start_step,
  num_steps: int,
  *,
  model,
  tx,
  spec: StepSpec,
  placement=None,
):
  """``num_steps`` steps of every particle, one compiled loop (``lax.scan``).

  The steps may span several epochs (a whole round, even): each particle's
  permutation of the training set is drawn at the first step and again at
  every epoch boundary inside the loop. Jit this with ``num_steps``,
  ``model``, ``tx``, ``spec`` static.

  Args:
    states: stacked ``ParticleState``, leaves [N, ...].
    start_step: global step of the first step (int32 scalar).

  Returns:
    (new states, losses float32 [num_steps, N]).
  """
  n = states.key.shape[0]

  def draw_permutations(step):
    epoch = step // spec.steps_per_epoch
    return lift_over_particles(
      lambda key: data_lib.compute_epoch_permutation(key, epoch, spec.num_examples), n, placement
    )(states.key)

  step_fn = lift_over_particles(
    functools.partial(train_step, model=model, tx=tx, spec=spec, placement=placement),
    n,
    placement,
    in_axes=(0, None, 0, None, None),
  )

  def body(carry, step):
    states, permutations = carry
    permutations = jax.lax.cond(
      step % spec.steps_per_epoch == 0, draw_permutations, lambda _: permutations, step
    )
    states, loss = step_fn(states, step, permutations, mask, data)
    return (constrain_particles(states, n, placement), permutations), loss

  steps = start_step + jnp.arange(num_steps, dtype=jnp.int32)
  init = (constrain_particles(states, n, placement), draw_permutations(start_step))
  (states, _), losses = jax.lax.scan(body, init, steps)
  if placement is not None:  # every process reads the losses (progress, divergence check)
    losses = jax.lax.with_sharding_constraint(losses, placement.replicated)
  return states, losses


def create_particles(params, batch_stats, mask, keys, tx, placement=None):
  """N particles at the same ticket; ``keys`` [N, 2] gives each its data order."""
  n = keys.shape[0]
  states = lift_over_particles(
    lambda key: create_particle(params, batch_stats, mask, key, tx), n, placement
  )(keys)
  return constrain_particles(states, n, placement)


def compute_solutions(states: ParticleState, placement=None):
  """Each particle's output weights: its SWA mean, or its last weights."""
  return lift_over_particles(
    lambda s: swa.compute_swa_solution(s.swa, s.params), states.key.shape[0], placement
  )(states)
