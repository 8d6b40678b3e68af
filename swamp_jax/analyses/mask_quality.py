"""Mask quality: IMP retraining of the rewound ticket on a fixed mask (the paper's claim 5).

Claim 5 says SWAMP's mask is better: IMP training on SWAMP's round-r mask
beats IMP on IMP's own round-r mask. Only the mask may differ between the
two, so ``retrain_on_mask`` trains exactly what IMP's round r trains (one
network, no SWA, IMP's learning-rate schedule, the ticket at T0 with its
BatchNorm statistics, round r's data order) on the mask it is given. On
IMP's own mask it reproduces the IMP run's round r.

The ticket is recomputed from the config (the dense training to T0 is
deterministic, and does not depend on the SWA settings, so IMP's and SWAMP's
tickets of one seed are the same) unless given; ``run`` also saves it in the
workdir (``ticket/``).

A round is trained by the public ``swamp_jax.train_round`` (``rounds``), so it
trains as ``run`` trains it, with no copy of the training loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from swamp_jax import masking, rounds
from swamp_jax import workdir as workdir_lib


class MaskRetrainResult(NamedTuple):
  """One IMP round trained on a given mask (host values)."""

  test_accuracy: float
  test_loss: float
  validation_accuracy: float | None  # None without a validation split
  sparsity: float  # of the prunable weights, from the mask
  params: Any  # the trained weights (zero wherever the mask prunes)
  batch_stats: Any  # their recomputed (if the config says so) BN statistics
  mask: Any


def create_imp_config(config):
  """A copy of ``config`` that trains plain IMP: one particle, no SWA."""
  config = config.copy_and_resolve_references()
  config.num_particles = 1
  config.single_particle_rounds = 0
  config.swa.enabled = False
  config.progress = False
  return config


def retrain_on_mask(
  config,
  mask,
  ticket: rounds.Ticket | None = None,
  round_index: int = 0,
  dataset=None,
  *,
  model=None,
) -> MaskRetrainResult:
  """Trains one IMP round from the rewound ticket on ``mask``; evaluates it.

  Args:
    config: a run config; it is turned into IMP's (``create_imp_config``),
      whatever its particles and SWA settings.
    mask: bool pytree with the structure and shapes of the model's params
      (e.g. ``workdir_lib.load_round_model(workdir, r)['mask']``).
    ticket: the rewind point to start from; None: IMP's ticket of this
      config (``swamp_jax.compute_ticket(create_imp_config(config))``).
    round_index: whose data order to use (``imp.particle_key(seed, r, 0)``);
      with IMP's own round-r mask and r here, IMP's round r is reproduced.
    dataset: the in-memory ``Dataset`` the run trained on (``run(...,
      dataset=...)``); None: the one ``config.dataset`` names.
    model: the model the run was passed (``run(..., model=...)``, not
      registered); None: the one ``config.model`` names.

  Returns:
    A ``MaskRetrainResult``.

  Raises:
    ValueError: the mask (or the ticket) does not fit the model's params.
  """
  config = create_imp_config(config)
  out = rounds.train_round(config, ticket, mask, round_index, model=model, dataset=dataset)
  validation = out.metrics.get("average/validation_accuracy")
  prunable = masking.compute_prunable(out.params, config.prune_exclude, config.prune_leaves)
  mask = jax.tree_util.tree_map(lambda m: np.asarray(m, np.bool_), mask)
  return MaskRetrainResult(
    test_accuracy=float(out.metrics["average/test_accuracy"]),
    test_loss=float(out.metrics["average/test_loss"]),
    validation_accuracy=None if validation is None else float(validation),
    sparsity=masking.compute_sparsity(mask, prunable),
    params=out.params,
    batch_stats=out.batch_stats,
    mask=mask,
  )


def retrain_on_saved_mask(
  config,
  mask_workdir: str,
  round_index: int,
  ticket: rounds.Ticket | None = None,
  dataset=None,
  *,
  model=None,
) -> MaskRetrainResult:
  """``retrain_on_mask`` with the mask that ``mask_workdir``'s round ``round_index`` trained on.

  E.g. ``retrain_on_saved_mask(imp_config, swamp_workdir, r)`` against the
  IMP run's own round r (its ``results.jsonl``, or the same call with the
  IMP workdir) tests claim 5.
  """
  mask = workdir_lib.load_round_model(mask_workdir, round_index)["mask"]
  return retrain_on_mask(config, mask, ticket, round_index, dataset, model=model)
