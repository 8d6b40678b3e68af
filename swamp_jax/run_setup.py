"""What a run derives from its config before training: mesh, data on it, model,
learning-rate schedule, optimizer, and the jitted round programs."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from swamp_jax import (
  checkpointing,
  datasets,
  distributed,
  imp,
  masking,
  models,
  optimizers,
  particles,
  streamed_batchnorm,
  streamed_data,
  streamed_evaluation,
)
from swamp_jax import config as config_lib
from swamp_jax import data as data_lib
from swamp_jax.precision import with_compute_dtype


def resolve_optimizer(config, optimizer) -> optimizers.OptimizerFactory:
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


class StepCounts(NamedTuple):
  """A run's step numbers, in global steps (``rewind_step`` counts the dense phase)."""

  spe: int  # steps per epoch
  rewind_step: int  # T0
  end_step: int  # T
  checkpoint_every: int  # config.checkpoint.every_steps (0: at rounds' ends only)
  steps_per_call: int  # steps per compiled call: config.epochs_per_call epochs


class InitialWeights(NamedTuple):
  """The model's initialization on the mesh (replicated) and which leaves are prunable."""

  params: Any
  batch_stats: Any
  prunable: Any  # bool pytree like params


class RunData(NamedTuple):
  """The run's data on the mesh."""

  train_data: particles.DeviceData
  eval_data: imp.EvalData
  stream: Any = None  # streaming.TrainStream of a streamed run (dataset.pipeline)


class RunPrograms(NamedTuple):
  """The jitted round programs: the dense phase before the ticket, and the rounds."""

  pretrain: imp.RoundPrograms
  rounds: imp.RoundPrograms


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """Everything a run derives from its config before training, in parts of one concern."""

  config: ml_collections.ConfigDict
  dataset_name: str
  steps: StepCounts
  initial: InitialWeights
  placement: distributed.Placement
  data: RunData
  programs: RunPrograms


def phase_programs(programs: RunPrograms, phase: int) -> imp.RoundPrograms:
  """The programs that train ``phase`` (``checkpointing.PRETRAIN_PHASE`` or a round)."""
  return programs.pretrain if phase == checkpointing.PRETRAIN_PHASE else programs.rounds


def phase_keys(config, phase: int) -> jax.Array:
  """The data-order keys [n, 2] of ``phase``'s particles (one for the dense phase)."""
  if phase == checkpointing.PRETRAIN_PHASE:
    return imp.pretrain_key(config.seed)[None]
  n = config_lib.num_particles_in_round(config, phase)
  return jnp.stack([imp.particle_key(config.seed, phase, i) for i in range(n)])


def start_phase(setup: RunSetup, phase: int, ticket: imp.Ticket, mask):
  """``phase``'s particles rewound to ``ticket`` under ``mask``."""
  start = phase_programs(setup.programs, phase).start
  return start(ticket.params, ticket.batch_stats, mask, phase_keys(setup.config, phase))


def create_placement(config, warn: bool = True) -> distributed.Placement:
  """The run's mesh: config.mesh sizes (0 = automatic) over all devices of all processes."""
  mesh = distributed.create_mesh(
    config.num_particles, config.mesh.particle_axis, config.mesh.data_axis
  )
  placement = distributed.Placement(mesh)
  devices, used = jax.device_count(), mesh.devices.size
  if used < devices:
    whole = [
      f"{p} x {devices // p}"
      for p in distributed.valid_particle_axis_sizes(config.num_particles, devices)
    ]
    shape = f"mesh.particle_axis={placement.particle_axis} x mesh.data_axis={placement.data_axis}"
    if config.batch_size % placement.data_axis:
      raise ValueError(
        f"batch_size={config.batch_size} is not divisible by mesh.data_axis="
        f"{placement.data_axis}, and {shape} would use only {used} of the {devices} devices; "
        f"meshes that use them all for num_particles={config.num_particles}: {whole}"
      )
    if warn:
      logging.warning(
        "%s uses %d of the %d devices; meshes that use them all: %s", shape, used, devices, whole
      )
  distributed.check_batch_size(config.batch_size, placement)
  return placement


def check_config_inputs(config, dataset: datasets.Dataset | None = None) -> None:
  """Checks what ``config`` names outside itself (dataset, mesh on these devices),
  without reading data: ``run`` calls it before writing anything. An in-memory
  ``dataset`` is checked by its constructor; its augmentation here."""
  if dataset is None:
    datasets.check_config_dataset(config.dataset)
  else:
    datasets.resolve_augment(config, dataset)
  if config.dataset.train_size and jax.process_count() > 1:
    # The subset is a fixed permutation of the whole split, and each process reads only a
    # contiguous slice of the split: it would have to read the whole split to find its rows.
    raise ValueError(
      f"dataset.train_size={config.dataset.train_size} is not supported with "
      f"{jax.process_count()} processes (each reads only its own rows of the training "
      "split); set dataset.train_size=0 or run in one process"
    )
  create_placement(config, warn=False)


def create_config_model(config, num_classes: int):
  """``config.model`` as a model in the functional form (``models.create_configured_model``),
  computing in ``config.model.dtype``."""
  return with_compute_dtype(
    models.create_configured_model(config.model, num_classes), config.model.dtype
  )


def load_data(config, placement: distributed.Placement, dataset: datasets.Dataset | None = None):
  """The run's dataset (``datasets.load_dataset``), with the training set on the mesh.

  One process holds the whole training set on each device. With several
  processes each reads only its own rows (TFDS split slicing, or a slice of
  the in-memory ``dataset``) and the normalization statistics are combined
  across processes.
  """
  if not placement.multi_process:
    dataset = datasets.load_dataset(config, dataset)
    images, labels = dataset.train_images, dataset.train_labels
    num_train, padded, first = len(labels), len(labels), 0
    mean, std = dataset.mean, dataset.std
  else:
    from jax.experimental import multihost_utils

    if dataset is None:
      num_train = datasets.count_train_examples(config.dataset)
    else:
      num_train = len(dataset.train_labels)
    padded, first, count = distributed.rows_per_process(num_train, placement)
    stop = min(first + count, num_train)
    dataset = datasets.load_dataset(config, dataset, train_rows=(first, stop))
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


def create_setup(config, optimizer=None, prune_score=None, model=None, dataset=None) -> RunSetup:
  """Everything a run derives from its config before training: mesh, data on it,
  model, schedule, optimizer and the jitted round programs.

  ``model`` (a linen or nnx module) replaces ``config.model``; either is checked
  against the model contract (``models.check_model``) before any training.
  ``dataset`` (a ``datasets.Dataset``) replaces ``config.dataset``'s source
  (``datasets.load_dataset``).

  ``prune_score`` (``(params, prunable) -> scores``, higher keeps) replaces
  ``config.prune_criterion``; it is checked on the initial params here
  (``masking.check_score_fn``), before any training.
  """
  config_lib.validate_config(config)
  factory = resolve_optimizer(config, optimizer)
  placement = create_placement(config)
  streamed = streamed_data.resolve_pipeline(config, dataset) == "stream"
  load = streamed_data.load_streamed_data if streamed else load_data
  dataset, train_data, eval_data, num_train = load(config, placement, dataset)
  if model is None:
    model = create_config_model(config, dataset.num_classes)
  else:  # a model of the user's, in the config's compute dtype as the config's model
    model = with_compute_dtype(models.as_functional(model), config.model.dtype)
  spe = data_lib.steps_per_epoch(num_train, config.batch_size)
  if spe < 1:
    raise ValueError(
      f"batch_size {config.batch_size} exceeds the {num_train} "
      f"training examples of {dataset.name!r}"
    )
  rewind_step = config.rewind_epochs * spe
  end_step = rewind_step + config.epochs_per_round * spe
  swa_start = rewind_step + config_lib.swa_start_epoch(config) * spe if config.swa.enabled else None
  warmup = config_lib.warmup_steps(config, spe)
  schedule = optimizers.create_learning_rate_schedule(
    config.optimizer.learning_rate,
    end_step,
    swa_start,
    config.swa.learning_rate,
    config.optimizer.final_learning_rate,
    warmup,
    rewind_step,
  )
  augment = datasets.resolve_augment(config, dataset)
  spec = particles.StepSpec(
    batch_size=config.batch_size,
    num_examples=num_train,
    augment=augment,
    swa_start_step=end_step + 1 if swa_start is None else swa_start,
    swa_every_steps=config.swa.every_epochs * spe,
  )
  # The dense phase before the ticket: one network, no SWA.
  pretrain_spec = dataclasses.replace(spec, swa_start_step=rewind_step + 1)
  variables, num_logits = models.check_model(
    model,
    dataset.image_shape,
    dataset.num_classes,
    imp.init_key(config.seed),
    config.prune_leaves,
    config.prune_exclude,
  )
  if not streamed:  # a streamed training set's labels are read as it trains (never all)
    datasets.check_num_logits(dataset, num_logits)
  params, batch_stats = placement.replicate((variables["params"], variables.get("batch_stats", {})))
  prunable = masking.compute_prunable(params, config.prune_exclude, config.prune_leaves)
  pruning_rule = masking.PruningRule(config.prune_scope, config.prune_criterion, prune_score)
  if prune_score is not None:  # on this process's own copy: replicated arrays may span hosts
    masking.check_score_fn(prune_score, variables["params"], prunable)
  settings = imp.RoundSettings(
    prune_fraction=config.prune_fraction,
    bn_recompute=config.bn_recompute.enabled,
    bn_batch_size=config.batch_size,
    bn_num_batches=config.bn_recompute.num_batches,
    eval_batch_size=config.eval_batch_size,
    swa_snapshots=config_lib.count_swa_snapshots(config),
    bn_recompute_unaveraged=config.bn_recompute.unaveraged,
    pruning_rule=pruning_rule,
    bn_num_examples=num_train,
  )
  # The ticket is trained with the schedule of SWA-free IMP, whatever the SWA settings, so
  # IMP and SWAMP runs of one seed share their ticket and comparisons between them are paired.
  ticket_schedule = optimizers.create_learning_rate_schedule(
    config.optimizer.learning_rate,
    end_step,
    None,
    config.swa.learning_rate,
    config.optimizer.final_learning_rate,
    warmup,
    rewind_step,
  )
  pretrain_tx = optimizers.masked(factory(ticket_schedule))
  round_tx = optimizers.masked(factory(optimizers.offset_schedule(schedule, rewind_step)))
  stream = None
  rounds = imp.create_round_programs(model, round_tx, spec, prunable, settings, placement)
  if streamed:
    recompute = streamed_batchnorm.create_streamed_recompute(
      dataset.train, dataset.transform, model, settings, config.dataset.stream_workers, placement
    )
    evaluate = streamed_evaluation.create_host_evaluation(model, settings, placement)
    rounds = streamed_batchnorm.with_streamed_recompute(rounds, recompute, evaluate)
    programs = {"pretrain": (model, pretrain_tx, pretrain_spec), "rounds": (model, round_tx, spec)}
    stream = streamed_data.create_train_stream(config, dataset, train_data, programs, placement)
  return RunSetup(
    config=config,
    dataset_name=dataset.name,
    steps=StepCounts(
      spe=spe,
      rewind_step=rewind_step,
      end_step=end_step,
      checkpoint_every=config.checkpoint.every_steps,
      steps_per_call=config.epochs_per_call * spe,
    ),
    initial=InitialWeights(params, batch_stats, prunable),
    placement=placement,
    data=RunData(train_data, eval_data, stream),
    programs=RunPrograms(
      pretrain=imp.create_round_programs(
        model, pretrain_tx, pretrain_spec, prunable, settings, placement
      ),
      rounds=rounds,
    ),
  )


def create_initial_point(setup: RunSetup) -> checkpointing.ResumePoint:
  rewind_step = setup.steps.rewind_step
  phase = checkpointing.PRETRAIN_PHASE if rewind_step > 0 else 0
  ticket = imp.Ticket(setup.initial.params, setup.initial.batch_stats)
  mask = setup.placement.replicate(masking.create_dense_mask(setup.initial.params))
  step = 0 if phase == checkpointing.PRETRAIN_PHASE else rewind_step
  states = start_phase(setup, phase, ticket, mask)
  return checkpointing.ResumePoint(phase, step, ticket, mask, states, [])


def create_abstract_state(setup: RunSetup, phase: int) -> dict:
  """Shapes and dtypes of a checkpoint's state at ``phase``, to restore into."""
  ticket = imp.Ticket(setup.initial.params, setup.initial.batch_stats)
  mask = masking.create_dense_mask(setup.initial.params)
  shapes = jax.eval_shape(
    lambda: {"ticket": ticket, "mask": mask, "particles": start_phase(setup, phase, ticket, mask)}
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
