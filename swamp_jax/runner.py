"""``run(config)``: a whole SWAMP (or IMP-baseline) run, from data to saved model."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from swamp_jax import (
  checkpointing,
  datasets,
  distributed,
  imp,
  interrupts,
  masking,
  models,
  optimizers,
  run_setup,
)
from swamp_jax import config as config_lib
from swamp_jax import results as results_lib
from swamp_jax import workdir as workdir_lib


class _Progress:
  """A tqdm bar over all epochs of the run (silent when disabled)."""

  def __init__(self, total_epochs: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total_epochs, unit="epoch", dynamic_ncols=True)

  def update(self, epochs: float, **postfix):
    if self.bar is not None:
      self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(epochs)

  def write(self, text: str):
    if self.bar is not None:
      self.bar.write(text)
    else:
      logging.info(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def train_phase(
  setup: run_setup.RunSetup,
  phase: int,
  states,
  mask,
  start_step: int,
  end_step: int,
  after_chunk=None,
):
  """Trains ``states`` of ``phase`` over global steps [start_step, end_step).

  The pieces come from ``imp.compute_chunks``, so every caller runs the same
  compiled programs on the same steps as ``run`` (and reproduces it).

  Args:
    after_chunk: called as ``after_chunk(states, step, num_steps, losses)``
      after each piece (``step`` is the next step; ``losses`` [n, N] host).

  Returns:
    The trained states.

  Raises:
    FloatingPointError: a loss is NaN or inf (naming phase, step, particle).
  """
  programs = run_setup.phase_programs(setup.programs, phase)
  phase_start = 0 if phase == checkpointing.PRETRAIN_PHASE else setup.steps.rewind_step
  chunks = imp.compute_chunks(
    phase_start, start_step, end_step, setup.steps.steps_per_call, setup.steps.checkpoint_every
  )
  pretrain = phase == checkpointing.PRETRAIN_PHASE
  batches = None  # a streamed run's batches: a pure function of (keys, step), so resumable
  if setup.data.stream is not None:
    batches = setup.data.stream.batches(
      np.asarray(run_setup.phase_keys(setup.config, phase)), start_step, end_step
    )
  for start, n in chunks:
    if batches is None:
      states, losses = programs.train(
        states, mask, setup.data.train_data, imp.as_step(start), num_steps=n
      )
    else:
      states, losses = setup.data.stream.train(pretrain, states, mask, batches, start, n)
    losses = distributed.to_host(losses)
    if not np.all(np.isfinite(losses)):
      _raise_diverged(losses, phase, start)
    if after_chunk is not None:
      after_chunk(states, start + n, n, losses)
    interrupts.check()  # a Ctrl-C that Python dropped (see interrupts)
  return states


def train_ticket(setup: run_setup.RunSetup, states=None) -> imp.Ticket:
  """The ticket: weights and BN statistics at the rewind step T0.

  Args:
    states: the dense network's states at T0; None trains them from the
      initialization (deterministic: the same ticket ``run`` trains from).
  """
  ticket = imp.Ticket(setup.initial.params, setup.initial.batch_stats)
  if setup.steps.rewind_step == 0:
    return ticket
  if states is None:
    phase = checkpointing.PRETRAIN_PHASE
    dense = setup.placement.replicate(masking.create_dense_mask(setup.initial.params))
    states = run_setup.start_phase(setup, phase, ticket, dense)
    states = train_phase(setup, phase, states, dense, 0, setup.steps.rewind_step)
  return imp.Ticket(*jax.tree_util.tree_map(lambda x: x[0], (states.params, states.batch_stats)))


def _train(setup: run_setup.RunSetup, point: checkpointing.ResumePoint, manager, workdir, progress):
  """Trains from ``point`` to the end; returns (round results, final (params, bs, mask))."""
  config = setup.config
  phase, step, ticket, mask, states = point[:5]
  rounds = [results_lib.RoundResult(**d) for d in point.results]

  def checkpoint(phase, step, states):
    if manager is not None:
      results = [dataclasses.asdict(r) for r in rounds]
      point = checkpointing.ResumePoint(phase, step, ticket, mask, states, results)
      with interrupts.deferred():
        checkpointing.save(manager, point, config, setup.steps.rewind_step, setup.steps.end_step)

  def run_phase(phase, step, states, end):
    first = 0 if phase < 0 else setup.steps.rewind_step

    def after_chunk(states, step, n, losses):
      progress.update(
        n / setup.steps.spe,
        round="rewind" if phase < 0 else phase,
        epoch=-(-(step - first) // setup.steps.spe),
        loss=" ".join(f"{v:.3f}" for v in losses.mean(0)),
      )
      if setup.steps.checkpoint_every and step % setup.steps.checkpoint_every == 0 and step < end:
        checkpoint(phase, step, states)

    try:
      return train_phase(setup, phase, states, mask, step, end, after_chunk)
    except FloatingPointError:
      if manager is not None:
        with interrupts.deferred():
          manager.wait_until_finished()  # the last good checkpoint is safe before we stop
      raise

  if phase == checkpointing.PRETRAIN_PHASE:
    ticket = train_ticket(setup, run_phase(phase, step, states, setup.steps.rewind_step))
    if workdir is not None:
      with interrupts.deferred():
        workdir_lib.save_tree(os.path.join(workdir, workdir_lib.TICKET_DIR), ticket._asdict())
    phase, step = 0, setup.steps.rewind_step
    states = run_setup.start_phase(setup, phase, ticket, mask)
    checkpoint(phase, step, states)

  final = None
  while phase <= config.num_rounds:
    t0 = time.time()
    states = run_phase(phase, step, states, setup.steps.end_step)
    prune_key = imp.prune_key(config.seed, phase)
    out = setup.programs.rounds.finish(
      states, mask, setup.data.train_data, setup.data.eval_data, prune_key
    )
    remaining, total = masking.count_prunable(mask, setup.initial.prunable)
    result = results_lib.RoundResult.from_metrics(
      phase,
      int(remaining),
      total,
      int(states.key.shape[0]),
      distributed.to_host(out.metrics),
      time.time() - t0,
    )
    rounds.append(result)
    progress.write(
      f"round {phase}: sparsity {100 * result.sparsity:.2f}%  "
      f"average {100 * result.test_accuracy:.2f}%  particles "
      + " ".join(f"{100 * a:.2f}" for a in result.particle_test_accuracy)
    )
    if workdir is not None:
      with interrupts.deferred():
        workdir_lib.save_round_model(
          workdir, phase, out, mask, config.save_particles
        )  # every process
      if jax.process_index() == 0:
        results_lib.write_results(workdir, rounds)
    final = (out.params, out.batch_stats, mask)
    mask, phase, step = out.next_mask, phase + 1, setup.steps.rewind_step
    if phase <= config.num_rounds:
      states = run_setup.start_phase(setup, phase, ticket, mask)
      checkpoint(phase, step, states)
  return rounds, final


def _raise_diverged(losses: np.ndarray, phase: int, start_step: int):
  step, particle = np.argwhere(~np.isfinite(losses))[0]
  where = "the dense training to the rewind point" if phase < 0 else f"round {phase}"
  raise FloatingPointError(
    f"training diverged: loss {losses[step, particle]} in {where} at step "
    f"{start_step + int(step)}, particle {int(particle)}; the last good checkpoint is kept "
    "(to try other settings, use a new workdir or overwrite=True)"
  )


@interrupts.handled()  # Ctrl-C stops a run between saves and is never dropped
def run(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  optimizer: optimizers.OptimizerFactory | optax.GradientTransformation | None = None,
  *,
  model=None,
  dataset=None,
  prune_score=None,
) -> results_lib.SwampResult:
  """Runs SWAMP as configured and returns its per-round results and final model.

  With a workdir the run is preemption-safe: it checkpoints (orbax) at every
  round's end and every ``checkpoint.every_steps`` steps, and the same call
  on the same workdir resumes from the newest complete checkpoint, finishing
  with exactly the result an uninterrupted run has.

  Args:
    config: a config from ``get_default_config()`` or ``configs/*.py``.
      ``num_particles=1`` with ``swa.enabled=False`` is IMP; with SWA,
      IMP+SWA; ``swa.enabled=False`` with N > 1 is SWAMP without SWA;
      ``single_particle_rounds=k`` is SWAMP+.
    workdir: where to write ``results.jsonl`` (one line per round, as each
      round ends), ``config.json``, checkpoints, the accuracy-vs-sparsity
      plot and the final averaged model and mask (orbax). None: nothing is
      written and nothing can be resumed.
    optimizer: a custom optax optimizer, as ``schedule -> transform`` (it
      gets SWAMP's learning-rate schedule, resumed at the rewind step each
      round) or a fixed ``optax.GradientTransformation``. It is wrapped with
      ``optimizers.masked``; None builds ``config.optimizer``.
    model: your own model, replacing ``config.model``: a ``flax.linen.Module``
      whose ``__call__(x, train: bool)`` returns logits [batch, classes]
      (BatchNorm statistics, if any, in ``batch_stats``), or a
      ``flax.nnx.Module`` with the same ``__call__`` (lifted with
      ``nnx.split``/``nnx.merge``; its weights are the initialization). It is
      checked (``models.check_model``) before anything is written. A model
      object cannot be rebuilt from a config: the saved ``config.json`` names
      it ``'<passed to run(model=...)> ClassName'``, and saved-run analyses
      refuse it with an error saying to register it instead
      (``swamp_jax.register_model``, then ``config.model.name``), which is
      how a model is made rebuildable everywhere. Resuming needs the same
      model passed again.
    dataset: your own data, a ``swamp_jax.Dataset`` (``Dataset.from_arrays``,
      ``Dataset.from_tfds``) replacing ``config.dataset``'s source;
      ``dataset.validation_size``, ``train_size`` and ``augment`` still
      apply. Its name, shapes and a digest of its arrays are recorded in
      the config (``dataset.digest``), so resuming needs the same arrays and
      analyses of the run take them as ``dataset=``.
    prune_score: your own pruning rule, ``prune_score(params, prunable) ->
      scores``: a pytree with the structure of params whose prunable leaves
      are float arrays of the params' shapes (higher keeps; other leaves are
      ignored, None is fine). It replaces ``config.prune_criterion`` and goes
      through the same exact-count selection (``config.prune_scope``). It is
      checked on the initial params before anything is written to
      ``workdir``. It is not part of the config: resuming a run needs the
      same function passed again.

  Returns:
    A ``SwampResult``.

  Raises:
    ValueError: a config field is unknown or out of range, the model or
      dataset name is unknown, the model breaks the contract (no ``train``
      argument, logits not [batch, classes], fewer logits than classes, no
      prunable weights: the part is named), a split or feature key the
      dataset lacks (the available ones are named), labels the model's logits
      cannot hold, or ``prune_score``'s scores do not fit the params (the
      leaf is named).
    FileExistsError: ``workdir`` holds a finished run and not ``overwrite``,
      or is a file.
    workdir.WorkdirInUseError: another process is running in ``workdir``.
    checkpointing.IncompatibleCheckpointError: ``workdir`` holds checkpoints
      of a run with different math (the fields are named).
    FloatingPointError: a particle's loss became NaN or inf (after the last
      good checkpoint is on disk).
  """
  # Everything that can be checked is checked before anything is written.
  if dataset is not None:
    config = datasets.record_dataset(config, dataset)  # a copy: the caller's is unchanged
  config_lib.validate_config(config)
  run_setup.resolve_optimizer(config, optimizer)
  if model is None:
    models.get_factory(config.model.name)  # unknown model names
  else:
    model = models.as_functional(model)
    models.check_train_argument(model)
    config = _name_passed_model(config, model)
  # The dataset and its splits (or the in-memory one), the mesh on these devices.
  run_setup.check_config_inputs(config, dataset)
  primary = jax.process_index() == 0  # writes the files that are not checkpoints

  def create_setup():
    return run_setup.create_setup(config, optimizer, prune_score, model=model, dataset=dataset)

  if workdir is None:
    return _run(config, None, create_setup(), primary)
  workdir = os.path.abspath(workdir)
  workdir_lib.check_workdir_path(workdir)
  created = not os.path.exists(workdir)
  # One lock per workdir, taken by the primary process (on a filesystem shared by all).
  lock = workdir_lib.lock_workdir(workdir) if primary else None
  try:
    # Under the lock (a second launch is refused before it loads anything), but before the
    # workdir is prepared: a bad prune_score fails here, and overwrite has removed nothing.
    setup = create_setup()
    workdir_lib.prepare_workdir(workdir, config.overwrite, primary)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("swamp_jax: workdir prepared")
    outcome = _run(config, workdir, setup, primary)
    if primary and workdir_lib.read_divergence(workdir) is not None:
      os.remove(os.path.join(workdir, workdir_lib.DIVERGED_FILE))  # this attempt finished
  except FloatingPointError as e:
    if primary:
      workdir_lib.record_divergence(workdir, str(e))
    raise
  except checkpointing.IncompatibleCheckpointError as e:
    diverged = workdir_lib.read_divergence(workdir)
    if diverged is None:
      raise
    raise checkpointing.IncompatibleCheckpointError(
      f"the run in {workdir!r} stopped because it diverged ({diverged}), and its checkpoints "
      "cannot be resumed with other settings: rerun in a new workdir, or with overwrite=True "
      f"(--config.overwrite=True) to replace it. Details: {e}"
    ) from e
  except BaseException:
    if created and primary:
      workdir_lib.remove_if_unused(workdir)  # an error before the first checkpoint
    raise
  finally:
    if lock is not None:
      lock.close()
  return outcome


def _name_passed_model(config, model):
  """A copy of ``config`` whose model name says that ``model`` was passed as an object:
  written to config.json and the checkpoints, it makes a rebuild by name fail clearly
  (``models.get_factory``) instead of building ``config.model.name``'s model."""
  kind = model.module_type if isinstance(model, models.NnxModel) else type(model)
  config = config.copy_and_resolve_references()
  config.model.name = f"{models.registry.PASSED_MODEL_PREFIX} {kind.__name__}"
  return config


def _run(config, workdir, setup, primary) -> results_lib.SwampResult:
  """``run`` once its inputs are checked and ``workdir`` (if any) is locked and prepared."""
  manager = None
  if workdir is not None:
    manager = checkpointing.create_manager(workdir, config.checkpoint.keep)
  progress = _Progress(
    config.rewind_epochs + (config.num_rounds + 1) * config.epochs_per_round,
    config.progress and primary,
  )
  try:
    point = None
    if manager is not None:
      point = checkpointing.restore_latest(
        manager, config, lambda phase: run_setup.create_abstract_state(setup, phase)
      )
    resumed = point is not None
    if point is None:
      point = run_setup.create_initial_point(setup)
      if manager is not None:  # a good state on disk before anything can diverge
        with interrupts.deferred():
          checkpointing.save(manager, point, config, setup.steps.rewind_step, setup.steps.end_step)
    else:
      done = checkpointing.progress_step(
        point.phase, point.step, setup.steps.rewind_step, setup.steps.end_step
      )
      progress.update(done / setup.steps.spe, resumed=f"round {point.phase} step {point.step}")
    if workdir is not None and primary:
      with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if workdir is not None:
      with interrupts.deferred():
        workdir_lib.restore_files(workdir, point, primary, resumed)
    rounds, final = _train(setup, point, manager, workdir, progress)
  finally:
    progress.close()
    if manager is not None:
      with interrupts.deferred():
        manager.wait_until_finished()
        manager.close()

  params, batch_stats, mask = distributed.to_host(final)
  outcome = results_lib.SwampResult(rounds, params, batch_stats, mask, workdir)
  if primary:
    print(outcome.table(), flush=True)
  if workdir is not None and primary:
    results_lib.plot_accuracy_vs_sparsity(
      rounds,
      os.path.join(workdir, results_lib.PLOT_FILE),
      f"{config.model.name} on {config.dataset.name}, N={config.num_particles}",
    )
  if workdir is not None:
    with interrupts.deferred():
      workdir_lib.save_final_model(
        os.path.join(workdir, workdir_lib.FINAL_MODEL_DIR), params, batch_stats, mask
      )
  return outcome
