"""One IMP round as a public function: a config's ticket, and a round trained from a ticket
on any mask.

``run`` trains round r from the ticket (the weights and BatchNorm statistics at the rewind
step T0) under round r's mask. Analyses and researchers also want a round on a mask of
their choosing (the paper's claim 5 retrains IMP on SWAMP's mask; a new pruning rule's mask
can be judged the same way), so these two pieces are public. They build the run's setup
(``run_setup.create_setup``) and train with ``runner.train_phase``: a round trains exactly
as ``run`` trains it (the same jitted programs on the same steps), with no copy of the
training loop.
"""

from __future__ import annotations

import jax
import numpy as np

from swamp_jax import datasets, distributed, imp, run_setup, runner
from swamp_jax.imp import RoundOutput, Ticket


def _create_setup(config, model, dataset, optimizer=None, prune_score=None):
  if dataset is not None and not config.dataset.digest:  # as run(config, dataset=) records it
    config = datasets.record_dataset(config, dataset)
  return run_setup.create_setup(config, optimizer, prune_score, model=model, dataset=dataset)


def _check_fits(what: str, tree, params) -> None:
  """``tree`` has the structure and leaf shapes of ``params``, or a ValueError names the
  first difference."""
  structure = jax.tree_util.tree_structure(params)
  if jax.tree_util.tree_structure(tree) != structure:
    raise ValueError(
      f"{what}: its structure {jax.tree_util.tree_structure(tree)} differs from the "
      f"model's {structure}"
    )
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
  for (path, leaf), expected in zip(
    paths_and_leaves, jax.tree_util.tree_leaves(params), strict=True
  ):
    if np.shape(leaf) != np.shape(expected):
      raise ValueError(
        f"{what}: leaf {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, the "
        f"model's {np.shape(expected)}"
      )


def compute_ticket(config, *, model=None, dataset=None, optimizer=None) -> Ticket:
  """The ticket that ``run(config, model=model, dataset=dataset, optimizer=optimizer)``
  trains its rounds from.

  With ``rewind_epochs=0`` it is the initialization; otherwise the dense network trained
  to T0 with one particle and no SWA (so IMP's and SWAMP's tickets of one seed are the
  same). Deterministic: the same arguments give the run's ticket bit for bit (``run``
  also saves it in ``workdir/ticket``).

  Args:
    config: a run config (``get_default_config()``, ``configs/*.py`` or a saved run's).
    model: a linen or NNX module replacing ``config.model``, as ``run(model=)``.
    dataset: an in-memory ``Dataset`` replacing ``config.dataset``'s source; for a
      saved run's config it must hold the arrays the run recorded.
    optimizer: as ``run``'s.

  Returns:
    A ``Ticket(params, batch_stats)`` of host numpy arrays (no particle axis).
  """
  setup = _create_setup(config, model, dataset, optimizer)
  return distributed.to_host(runner.train_ticket(setup))


def train_round(
  config,
  ticket: Ticket | None,
  mask,
  round_index: int = 0,
  *,
  model=None,
  dataset=None,
  optimizer=None,
  prune_score=None,
) -> RoundOutput:
  """Trains round ``round_index`` of ``run(config)`` from ``ticket`` on ``mask``.

  The round is the run's: ``config_lib.num_particles_in_round(config, round_index)``
  particles rewound to the ticket under ``mask``, their data orders
  ``imp.particle_key(seed, round_index, i)``, the run's schedule and SWA settings, then
  the average, its BatchNorm recompute, evaluation and the next mask. Given round r's
  ticket and mask of a run, it reproduces that run's round r. For plain IMP, pass an IMP
  config (one particle, no SWA; ``analyses.mask_quality.create_imp_config``).

  Args:
    config: a run config.
    ticket: the rewind point (``compute_ticket``, or ``workdir/ticket`` of a run); None:
      ``compute_ticket(config, ...)``, computed here on the same setup.
    mask: bool pytree with the structure and shapes of the model's params (no particle
      axis), e.g. ``load_round_model(workdir, r)['mask']``.
    round_index: the round trained (>= 0): its particle count and data order.
    model, dataset, optimizer: as ``run``'s (a model passed to ``run`` unregistered is
      passed here again).
    prune_score: as ``run``'s; it prunes the returned ``next_mask``.

  Returns:
    An ``imp.RoundOutput`` of host numpy arrays: ``params`` and ``batch_stats`` (the
    averaged model; zero wherever ``mask`` prunes), ``next_mask`` (pruned from it),
    ``metrics`` (name -> scalar, or [N] per particle: ``average/test_accuracy``, ...,
    ``average/validation_*`` with a validation split), ``particle_params`` and
    ``particle_batch_stats`` ([N, ...]; in a run of several processes, only the first
    particle shard this process holds).

  Raises:
    ValueError: ``round_index`` is negative, or the mask or the ticket does not fit the
      model's params (the leaf is named); raised before any training.
  """
  if not isinstance(round_index, int | np.integer) or round_index < 0:
    raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}")
  setup = _create_setup(config, model, dataset, optimizer, prune_score)
  _check_fits("mask", mask, setup.initial.params)
  if ticket is not None:
    _check_fits("ticket.params", ticket.params, setup.initial.params)
    _check_fits("ticket.batch_stats", ticket.batch_stats, setup.initial.batch_stats)
  # Host arrays: the programs place them wherever their inputs are meant to live.
  mask = jax.tree_util.tree_map(lambda m: np.asarray(m, np.bool_), mask)
  if ticket is None:
    ticket = runner.train_ticket(setup)
  round_index = int(round_index)
  states = run_setup.start_phase(setup, round_index, ticket, mask)
  states = runner.train_phase(
    setup, round_index, states, mask, setup.steps.rewind_step, setup.steps.end_step
  )
  prune_key = imp.prune_key(setup.config.seed, round_index)
  out = setup.programs.rounds.finish(
    states, mask, setup.data.train_data, setup.data.eval_data, prune_key
  )
  return distributed.to_host(out)
