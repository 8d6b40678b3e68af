"""Learning-rate schedules and the masked wrapper around any optax transform.

Users extend swamp_jax with their own optax transforms. ``masked`` wraps any
``optax.GradientTransformation`` (``optax.adamw``, a chain with clipping,
...) so that gradients going in and updates coming out are zero wherever the
mask prunes: pruned weights stay exactly zero whatever the inner transform
does (momentum, decoupled weight decay, noise).

The mask is an extra argument of ``update`` rather than part of the state:
all particles share one mask, so it carries no particle axis and is not
duplicated into every particle's optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax

from swamp_jax import masking

OptimizerFactory = Callable[[optax.Schedule], optax.GradientTransformation]


class MaskedState(NamedTuple):
  """State of ``masked``: the wrapped transform's state."""

  inner_state: optax.OptState


def masked(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it only ever moves unpruned weights.

  Example::

    tx = masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, mask=mask)

  Args:
    inner: any optax transform; extra keyword arguments other than ``mask``
      are forwarded to it.

  Returns:
    A transform whose ``update(updates, state, params=None, *, mask, ...)``
    zeroes ``updates`` outside ``mask`` before and after ``inner``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MaskedState(inner.init(params))

  def update_fn(updates, state, params=None, *, mask, **extra_args):
    updates = masking.apply_mask(updates, mask)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return masking.apply_mask(updates, mask), MaskedState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def create_learning_rate_schedule(
  peak_learning_rate: float,
  total_steps: int,
  swa_start_step: int | None,
  swa_learning_rate: float,
  final_learning_rate: float = 0.0,
  warmup_steps: int = 0,
  rewind_step: int = 0,
) -> optax.Schedule:
  """The per-run schedule over global steps [0, total_steps].

  With SWA (``swa_start_step`` not None): cosine from the peak down to
  ``swa_learning_rate`` at ``swa_start_step``, then constant. Without SWA:
  cosine from the peak down to ``final_learning_rate`` at ``total_steps``.
  Every IMP round trains steps T0..T of this same schedule.

  With ``warmup_steps`` W > 0 that schedule is multiplied by a linear ramp
  ``min(1, (k + 1) / W)``, k counting the steps since the start of the phase:
  step 0 for the dense phase before the ticket, ``rewind_step`` T0 for every
  round. W = 0 returns the schedule above unchanged.
  """
  if swa_start_step is None:
    schedule = optax.cosine_decay_schedule(
      peak_learning_rate, max(total_steps, 1), alpha=final_learning_rate / peak_learning_rate
    )
  else:
    cosine = optax.cosine_decay_schedule(
      peak_learning_rate, max(swa_start_step, 1), alpha=swa_learning_rate / peak_learning_rate
    )
    schedule = optax.join_schedules(
      [cosine, optax.constant_schedule(swa_learning_rate)], boundaries=[swa_start_step]
    )
  if warmup_steps <= 0:
    return schedule

  # The warm-up restarts at every rewind, rather than being replayed once as part of steps
  # 0..T: each round starts a fresh optimizer state (no momentum) on a freshly pruned ticket, the
  # instability that warm-up exists for at large batch (Goyal et al. 2017), and the co-author
  # ImageNet recipe (../shared/SWAMP.md) warms up every IMP cycle (10% of its 48k iterations).
  # A rewind point past W would otherwise leave every round without any warm-up.
  def warmed_up(step):
    step = jnp.asarray(step)
    since_phase_start = jnp.where(step >= rewind_step, step - rewind_step, step)
    ramp = jnp.minimum(1.0, (since_phase_start + 1) / warmup_steps)
    return schedule(step) * ramp

  return warmed_up


def offset_schedule(schedule: optax.Schedule, offset: int) -> optax.Schedule:
  """``schedule`` as seen by an optimizer whose step count starts at ``offset``.

  Each round starts a fresh optimizer state (count 0) at the rewind step T0,
  and its learning rate resumes at T0.
  """
  return lambda count: schedule(jnp.asarray(count) + offset)


def create_sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled L2 weight decay, as in the paper."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
  )


def create_optimizer_factory(config) -> OptimizerFactory:
  """The optimizer named by ``config.optimizer`` as ``schedule -> transform``."""
  opt = config.optimizer
  if opt.name == "sgd":
    return lambda lr: create_sgd(lr, opt.momentum, opt.nesterov, opt.weight_decay)
  if opt.name == "adamw":
    return lambda lr: optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  if opt.name == "adam":
    return lambda lr: optax.chain(
      optax.add_decayed_weights(opt.weight_decay), optax.adam(lr, b1=opt.b1, b2=opt.b2)
    )
  raise ValueError(f"unknown optimizer.name {opt.name!r}; known: 'sgd', 'adamw', 'adam'")


OPTIMIZER_NAMES = ("sgd", "adamw", "adam")
