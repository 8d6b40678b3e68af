"""``run(config)``: a whole SWAMP (or IMP-baseline) run, from data to saved model."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from swamp_jax import checkpointing, distributed, imp, masking, models, optimizers, particles
from swamp_jax import config as config_lib
from swamp_jax import data as data_lib
from swamp_jax import results as results_lib

FINAL_MODEL_DIR = "final_model"
ROUND_MODELS_DIR = "round_models"
TICKET_DIR = "ticket"
CONFIG_FILE = "config.json"


def _prepare_workdir(workdir: str, overwrite: bool, primary: bool = True) -> None:
  """Refuses a finished run unless told to overwrite; an unfinished one is resumed.

  With ``overwrite`` everything an earlier run wrote here is removed first
  (by the primary process alone).
  """
  os.makedirs(workdir, exist_ok=True)
  owned = [
    FINAL_MODEL_DIR,
    ROUND_MODELS_DIR,
    TICKET_DIR,
    checkpointing.CHECKPOINT_DIR,
    checkpointing.CHECKPOINT_DIR + checkpointing.QUARANTINE_SUFFIX,
    results_lib.RESULTS_FILE,
    CONFIG_FILE,
    results_lib.PLOT_FILE,
  ]
  if overwrite:
    for p in owned if primary else ():
      path = os.path.join(workdir, p)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    return
  if os.path.exists(os.path.join(workdir, FINAL_MODEL_DIR)):
    raise FileExistsError(
      f"workdir {workdir!r} already holds a finished run ({FINAL_MODEL_DIR}, "
      f"{results_lib.RESULTS_FILE}); choose another workdir, or set overwrite=True "
      "(--config.overwrite=True) to replace it"
    )
  has_results = os.path.exists(os.path.join(workdir, results_lib.RESULTS_FILE))
  if has_results and not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise FileExistsError(
      f"workdir {workdir!r} holds results of an earlier run but no checkpoints to resume from; "
      "choose another workdir, or set overwrite=True to replace it"
    )


def _resolve_optimizer(config, optimizer) -> optimizers.OptimizerFactory:
  if optimizer is None:
    return optimizers.create_optimizer_factory(config)
  if isinstance(optimizer, optax.GradientTransformation):
    logging.warning(
      "optimizer is a fixed transform: its own learning rate is used and does not "
      "resume at the rewind step; pass `lambda schedule: ...` to use SWAMP's."
    )
    return lambda _: optimizer
  if callable(optimizer):
    return optimizer
  raise TypeError(
    "optimizer must be an optax.GradientTransformation or a function schedule -> transform, "
    f"got {type(optimizer).__name__}"
  )


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


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """Everything a run derives from its config before training."""

  config: ml_collections.ConfigDict
  dataset_name: str
  spe: int  # steps per epoch
  rewind_step: int  # T0
  end_step: int  # T
  params: object  # initial weights
  batch_stats: object
  prunable: object
  placement: distributed.Placement
  pretrain: imp.RoundPrograms
  rounds: imp.RoundPrograms
  train_data: particles.DeviceData
  eval_data: imp.EvalData

  @property
  def checkpoint_every(self) -> int:
    return self.config.checkpoint.every_steps

  @property
  def steps_per_call(self) -> int:
    return self.config.epochs_per_call * self.spe

  def programs(self, phase: int) -> imp.RoundPrograms:
    return self.pretrain if phase == checkpointing.PRETRAIN_PHASE else self.rounds

  def keys(self, phase: int) -> jax.Array:
    if phase == checkpointing.PRETRAIN_PHASE:
      return imp.pretrain_key(self.config.seed)[None]
    n = config_lib.num_particles_in_round(self.config, phase)
    return jnp.stack([imp.particle_key(self.config.seed, phase, i) for i in range(n)])

  def start(self, phase: int, ticket: imp.Ticket, mask):
    return self.programs(phase).start(ticket.params, ticket.batch_stats, mask, self.keys(phase))


def create_placement(config) -> distributed.Placement:
  """The run's mesh: config.mesh sizes (0 = automatic) over all devices of all processes."""
  mesh = distributed.create_mesh(
    config.num_particles, config.mesh.particle_axis, config.mesh.data_axis
  )
  placement = distributed.Placement(mesh)
  distributed.check_batch_size(config.batch_size, placement)
  return placement


def _load_data(config, placement: distributed.Placement):
  """The dataset, with the training set on the mesh.

  One process holds the whole training set on each device. With several
  processes each reads only its own rows (TFDS split slicing) and the
  normalization statistics are combined across processes.
  """
  name, data_dir = config.dataset.name, config.dataset.data_dir
  cache_dir = config.dataset.cache_dir or None
  if not placement.multi_process:
    dataset = data_lib.load_dataset(name, data_dir, config.dataset.validation_size, cache_dir)
    images, labels = dataset.train_images, dataset.train_labels
    num_train, padded, first = len(labels), len(labels), 0
    mean, std = dataset.mean, dataset.std
  else:
    from jax.experimental import multihost_utils

    num_train = data_lib.count_train_examples(name, data_dir)
    padded, first, count = distributed.rows_per_process(num_train, placement)
    stop = min(first + count, num_train)
    dataset = data_lib.load_dataset(
      name, data_dir, config.dataset.validation_size, cache_dir, train_rows=(first, stop)
    )
    sums = multihost_utils.process_allgather(data_lib.compute_channel_sums(dataset.train_images))
    mean, std = data_lib.compute_channel_stats(*np.sum(sums, axis=0))
    pad = count - len(dataset.train_labels)  # rows past the end: never indexed
    images = np.concatenate(
      [dataset.train_images, np.zeros((pad, *dataset.image_shape), dataset.train_images.dtype)]
    )
    labels = np.concatenate([dataset.train_labels, np.zeros((pad,), np.int32)])
  rows = placement.dataset
  train = particles.DeviceData(
    distributed.put_process_rows(images, rows, padded, first),
    distributed.put_process_rows(labels, rows, padded, first),
    *placement.replicate((mean, std)),
  )
  evaluation_arrays = (
    dataset.test_images,
    dataset.test_labels,
    dataset.validation_images,
    dataset.validation_labels,
  )
  eval_data = imp.EvalData(*placement.replicate(evaluation_arrays))
  return dataset, train, eval_data, num_train


def create_setup(config, optimizer=None) -> RunSetup:
  """Everything a run derives from its config before training: mesh, data on it,
  model, schedule, optimizer and the jitted round programs."""
  config_lib.validate_config(config)
  factory = _resolve_optimizer(config, optimizer)
  placement = create_placement(config)
  dataset, train_data, eval_data, num_train = _load_data(config, placement)
  model = models.create_model(
    config.model.name, dataset.num_classes, config.model.conv_impl, config.model.bn_momentum
  )
  spe = data_lib.steps_per_epoch(num_train, config.batch_size)
  if spe < 1:
    raise ValueError(
      f"batch_size {config.batch_size} exceeds the {num_train} "
      f"training examples of {dataset.name!r}"
    )
  rewind_step = config.rewind_epochs * spe
  end_step = rewind_step + config.epochs_per_round * spe
  swa_start = rewind_step + config_lib.swa_start_epoch(config) * spe if config.swa.enabled else None
  schedule = optimizers.create_learning_rate_schedule(
    config.optimizer.learning_rate,
    end_step,
    swa_start,
    config.swa.learning_rate,
    config.optimizer.final_learning_rate,
  )
  augment = (
    data_lib.default_augment(dataset.name)
    if config.dataset.augment == "auto"
    else config.dataset.augment == "yes"
  )
  spec = particles.StepSpec(
    batch_size=config.batch_size,
    num_examples=num_train,
    augment=augment,
    swa_start_step=end_step + 1 if swa_start is None else swa_start,
    swa_every_steps=config.swa.every_epochs * spe,
  )
  # The dense phase before the ticket: one network, no SWA.
  pretrain_spec = dataclasses.replace(spec, swa_start_step=rewind_step + 1)
  variables = model.init(
    imp.init_key(config.seed), jnp.zeros((1, *dataset.image_shape), jnp.float32), train=False
  )
  params, batch_stats = placement.replicate((variables["params"], variables.get("batch_stats", {})))
  prunable = masking.compute_prunable(params, config.prune_exclude)
  settings = imp.RoundSettings(
    prune_fraction=config.prune_fraction,
    bn_recompute=config.bn_recompute.enabled,
    bn_batch_size=config.batch_size,
    bn_num_batches=config.bn_recompute.num_batches,
    eval_batch_size=config.eval_batch_size,
  )
  # The ticket is trained with the schedule of SWA-free IMP, whatever the SWA settings, so
  # IMP and SWAMP runs of one seed share their ticket and comparisons between them are paired.
  ticket_schedule = optimizers.create_learning_rate_schedule(
    config.optimizer.learning_rate,
    end_step,
    None,
    config.swa.learning_rate,
    config.optimizer.final_learning_rate,
  )
  pretrain_tx = optimizers.masked(factory(ticket_schedule))
  round_tx = optimizers.masked(factory(optimizers.offset_schedule(schedule, rewind_step)))
  return RunSetup(
    config=config,
    dataset_name=dataset.name,
    spe=spe,
    rewind_step=rewind_step,
    end_step=end_step,
    params=params,
    batch_stats=batch_stats,
    prunable=prunable,
    placement=placement,
    pretrain=imp.create_round_programs(
      model, pretrain_tx, pretrain_spec, prunable, settings, placement
    ),
    rounds=imp.create_round_programs(model, round_tx, spec, prunable, settings, placement),
    train_data=train_data,
    eval_data=eval_data,
  )


def _initial_point(setup: RunSetup) -> checkpointing.ResumePoint:
  phase = checkpointing.PRETRAIN_PHASE if setup.rewind_step > 0 else 0
  ticket = imp.Ticket(setup.params, setup.batch_stats)
  mask = setup.placement.replicate(masking.create_dense_mask(setup.params))
  step = 0 if phase == checkpointing.PRETRAIN_PHASE else setup.rewind_step
  return checkpointing.ResumePoint(phase, step, ticket, mask, setup.start(phase, ticket, mask), [])


def _abstract_state(setup: RunSetup, phase: int) -> dict:
  """Shapes and dtypes of a checkpoint's state at ``phase``, to restore into."""
  ticket = imp.Ticket(setup.params, setup.batch_stats)
  mask = masking.create_dense_mask(setup.params)
  shapes = jax.eval_shape(
    lambda: {"ticket": ticket, "mask": mask, "particles": setup.start(phase, ticket, mask)}
  )
  # Restore onto this run's mesh, whatever mesh wrote the checkpoint.
  n = int(shapes["particles"].key.shape[0])
  shardings = {
    "ticket": setup.placement.replicated,
    "mask": setup.placement.replicated,
    "particles": setup.placement.particles(n),
  }
  return {
    k: jax.tree_util.tree_map(
      lambda s, sh=shardings[k]: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), v
    )
    for k, v in shapes.items()
  }


def train_phase(
  setup: RunSetup, phase: int, states, mask, start_step: int, end_step: int, after_chunk=None
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
  programs = setup.programs(phase)
  phase_start = 0 if phase == checkpointing.PRETRAIN_PHASE else setup.rewind_step
  chunks = imp.compute_chunks(
    phase_start, start_step, end_step, setup.steps_per_call, setup.checkpoint_every
  )
  for start, n in chunks:
    states, losses = programs.train(states, mask, setup.train_data, imp.as_step(start), num_steps=n)
    losses = distributed.to_host(losses)
    if not np.all(np.isfinite(losses)):
      _raise_diverged(losses, phase, start)
    if after_chunk is not None:
      after_chunk(states, start + n, n, losses)
  return states


def compute_ticket(setup: RunSetup, states=None) -> imp.Ticket:
  """The ticket: weights and BN statistics at the rewind step T0.

  Args:
    states: the dense network's states at T0; None trains them from the
      initialization (deterministic: the same ticket ``run`` trains from).
  """
  ticket = imp.Ticket(setup.params, setup.batch_stats)
  if setup.rewind_step == 0:
    return ticket
  if states is None:
    phase = checkpointing.PRETRAIN_PHASE
    dense = setup.placement.replicate(masking.create_dense_mask(setup.params))
    states = train_phase(
      setup, phase, setup.start(phase, ticket, dense), dense, 0, setup.rewind_step
    )
  return imp.Ticket(*jax.tree_util.tree_map(lambda x: x[0], (states.params, states.batch_stats)))


def _train(setup: RunSetup, point: checkpointing.ResumePoint, manager, workdir, progress):
  """Trains from ``point`` to the end; returns (round results, final (params, bs, mask))."""
  config = setup.config
  phase, step, ticket, mask, states = point[:5]
  rounds = [results_lib.RoundResult(**d) for d in point.results]

  def checkpoint(phase, step, states):
    if manager is not None:
      results = [dataclasses.asdict(r) for r in rounds]
      point = checkpointing.ResumePoint(phase, step, ticket, mask, states, results)
      checkpointing.save(manager, point, config, setup.rewind_step, setup.end_step)

  def run_phase(phase, step, states, end):
    first = 0 if phase < 0 else setup.rewind_step

    def after_chunk(states, step, n, losses):
      progress.update(
        n / setup.spe,
        round="rewind" if phase < 0 else phase,
        epoch=-(-(step - first) // setup.spe),
        loss=" ".join(f"{v:.3f}" for v in losses.mean(0)),
      )
      if setup.checkpoint_every and step % setup.checkpoint_every == 0 and step < end:
        checkpoint(phase, step, states)

    try:
      return train_phase(setup, phase, states, mask, step, end, after_chunk)
    except FloatingPointError:
      if manager is not None:
        manager.wait_until_finished()  # the last good checkpoint is safe before we stop
      raise

  if phase == checkpointing.PRETRAIN_PHASE:
    ticket = compute_ticket(setup, run_phase(phase, step, states, setup.rewind_step))
    if workdir is not None:
      _save_tree(os.path.join(workdir, TICKET_DIR), ticket._asdict())
    phase, step = 0, setup.rewind_step
    states = setup.start(phase, ticket, mask)
    checkpoint(phase, step, states)

  final = None
  while phase <= config.num_rounds:
    t0 = time.time()
    states = run_phase(phase, step, states, setup.end_step)
    out = setup.rounds.finish(states, mask, setup.train_data, setup.eval_data)
    remaining, total = masking.count_prunable(mask, setup.prunable)
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
      save_round_model(workdir, phase, out, mask, config.save_particles)  # every process
      if jax.process_index() == 0:
        results_lib.append_result(workdir, result)
    final = (out.params, out.batch_stats, mask)
    mask, phase, step = out.next_mask, phase + 1, setup.rewind_step
    if phase <= config.num_rounds:
      states = setup.start(phase, ticket, mask)
      checkpoint(phase, step, states)
  return rounds, final


def _raise_diverged(losses: np.ndarray, phase: int, start_step: int):
  step, particle = np.argwhere(~np.isfinite(losses))[0]
  where = "the dense training to the rewind point" if phase < 0 else f"round {phase}"
  raise FloatingPointError(
    f"training diverged: loss {losses[step, particle]} in {where} at step "
    f"{start_step + int(step)}, particle {int(particle)}; the last good checkpoint is kept"
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  optimizer: optimizers.OptimizerFactory | optax.GradientTransformation | None = None,
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

  Returns:
    A ``SwampResult``.

  Raises:
    ValueError: a config field is unknown or out of range, or the model or
      dataset name is unknown.
    FileExistsError: ``workdir`` holds a finished run and not ``overwrite``.
    checkpointing.IncompatibleCheckpointError: ``workdir`` holds checkpoints
      of a run with different math (the fields are named).
    FloatingPointError: a particle's loss became NaN or inf (after the last
      good checkpoint is on disk).
  """
  config_lib.validate_config(config)
  _resolve_optimizer(config, optimizer)  # a bad optimizer fails before any I/O
  models.create_model(config.model.name, 10)  # so do unknown model names
  primary = jax.process_index() == 0  # writes the files that are not checkpoints
  if workdir is not None:
    workdir = os.path.abspath(workdir)
    _prepare_workdir(workdir, config.overwrite, primary)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("swamp_jax: workdir prepared")
  setup = create_setup(config, optimizer)
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
        manager, config, lambda phase: _abstract_state(setup, phase)
      )
    if point is None:
      point = _initial_point(setup)
      if manager is not None:  # a good state on disk before anything can diverge
        checkpointing.save(manager, point, config, setup.rewind_step, setup.end_step)
    else:
      done = checkpointing.progress_step(point.phase, point.step, setup.rewind_step, setup.end_step)
      progress.update(done / setup.spe, resumed=f"round {point.phase} step {point.step}")
    if workdir is not None and primary:
      with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    rounds, final = _train(setup, point, manager, workdir, progress)
  finally:
    progress.close()
    if manager is not None:
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
    save_final_model(os.path.join(workdir, FINAL_MODEL_DIR), params, batch_stats, mask)
  return outcome


def round_model_path(workdir: str, round_index: int) -> str:
  return os.path.join(workdir, ROUND_MODELS_DIR, f"round_{round_index:03d}")


def save_round_model(
  workdir: str, round_index: int, out: imp.RoundOutput, mask, with_particles: bool
) -> None:
  """Saves a round's averaged model and mask (and each particle's solution) with orbax.

  Analyses (ensembles, mode connectivity, flatness, mask quality) read these.
  Written before the round's result line, so a listed round always has its
  model; a resumed run rewrites the same values.
  """
  tree = {"params": out.params, "batch_stats": out.batch_stats, "mask": mask}
  if with_particles:
    tree["particle_params"] = out.particle_params
    tree["particle_batch_stats"] = out.particle_batch_stats
  _save_tree(round_model_path(workdir, round_index), tree)


def load_round_model(workdir: str, round_index: int) -> dict:
  """Restores what ``save_round_model`` wrote for ``round_index``."""
  return load_final_model(round_model_path(workdir, round_index))


def _save_tree(path: str, tree) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=True)


def save_final_model(path: str, params, batch_stats, mask) -> None:
  """Saves the averaged model and its mask with orbax (one pytree)."""
  _save_tree(path, {"params": params, "batch_stats": batch_stats, "mask": mask})


def load_final_model(path: str) -> dict:
  """Restores ``{'params', 'batch_stats', 'mask'}`` saved by ``run``."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path))
