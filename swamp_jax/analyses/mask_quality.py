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

This uses ``run_setup.create_setup`` and ``runner.train_phase``, so a round
trains as ``run`` trains it, with no copy of the training loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from swamp_jax import datasets, imp, masking, run_setup, runner
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


def _create_setup(config, dataset):
  if dataset is not None and not config.dataset.digest:  # as run(config, dataset=) records it
    config = datasets.record_dataset(config, dataset)
  return run_setup.create_setup(config, dataset=dataset)


def compute_ticket(config, dataset=None) -> imp.Ticket:
  """The ticket (weights and BN statistics at T0) that ``run(config, dataset=dataset)``
  trains from.

  With ``rewind_epochs=0`` it is the initialization. Deterministic: the same
  config and seed give the same ticket as the run.
  """
  return runner.compute_ticket(_create_setup(config, dataset))


def retrain_on_mask(
  config, mask, ticket: imp.Ticket | None = None, round_index: int = 0, dataset=None
):
  """Trains one IMP round from the rewound ticket on ``mask``; evaluates it.

  Args:
    config: a run config; it is turned into IMP's (``create_imp_config``),
      whatever its particles and SWA settings.
    mask: bool pytree with the structure and shapes of the model's params
      (e.g. ``workdir_lib.load_round_model(workdir, r)['mask']``).
    ticket: the rewind point to start from; None: IMP's ticket of this
      config (``compute_ticket(create_imp_config(config))``).
    round_index: whose data order to use (``imp.particle_key(seed, r, 0)``);
      with IMP's own round-r mask and r here, IMP's round r is reproduced.
    dataset: the in-memory ``Dataset`` the run trained on (``run(...,
      dataset=...)``); None: the one ``config.dataset`` names.

  Returns:
    A ``MaskRetrainResult``.

  Raises:
    ValueError: the mask does not fit the model's params.
  """
  setup = _create_setup(create_imp_config(config), dataset)
  params_struct = jax.tree_util.tree_structure(setup.params)
  if jax.tree_util.tree_structure(mask) != params_struct:
    raise ValueError(
      f"the mask's structure {jax.tree_util.tree_structure(mask)} differs from the "
      f"params' {params_struct}"
    )
  for m, p in zip(
    jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(setup.params), strict=True
  ):
    if np.shape(m) != np.shape(p):
      raise ValueError(
        f"a mask leaf of shape {np.shape(m)} does not fit a param of shape {np.shape(p)}"
      )
  # Host arrays: the programs place them wherever their inputs are meant to live.
  mask = jax.tree_util.tree_map(lambda m: np.asarray(m, np.bool_), mask)
  if ticket is None:
    ticket = runner.compute_ticket(setup)
  states = setup.start(round_index, ticket, mask)
  states = runner.train_phase(setup, round_index, states, mask, setup.rewind_step, setup.end_step)
  prune_key = imp.prune_key(setup.config.seed, round_index)
  out = setup.rounds.finish(states, mask, setup.train_data, setup.eval_data, prune_key)
  metrics = jax.device_get(out.metrics)
  validation = metrics.get("average/validation_accuracy")
  params, batch_stats, mask = jax.device_get((out.params, out.batch_stats, mask))
  return MaskRetrainResult(
    test_accuracy=float(metrics["average/test_accuracy"]),
    test_loss=float(metrics["average/test_loss"]),
    validation_accuracy=None if validation is None else float(validation),
    sparsity=masking.compute_sparsity(mask, setup.prunable),
    params=params,
    batch_stats=batch_stats,
    mask=mask,
  )


def retrain_on_saved_mask(
  config,
  mask_workdir: str,
  round_index: int,
  ticket: imp.Ticket | None = None,
  dataset=None,
) -> MaskRetrainResult:
  """``retrain_on_mask`` with the mask that ``mask_workdir``'s round ``round_index`` trained on.

  E.g. ``retrain_on_saved_mask(imp_config, swamp_workdir, r)`` against the
  IMP run's own round r (its ``results.jsonl``, or the same call with the
  IMP workdir) tests claim 5.
  """
  mask = workdir_lib.load_round_model(mask_workdir, round_index)["mask"]
  return retrain_on_mask(config, mask, ticket, round_index, dataset)
