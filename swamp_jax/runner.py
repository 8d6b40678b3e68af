"""``run(config)``: a whole SWAMP (or IMP-baseline) run, from data to saved model."""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from swamp_jax import config as config_lib
from swamp_jax import data as data_lib
from swamp_jax import imp, masking, models, optimizers, particles
from swamp_jax import results as results_lib

FINAL_MODEL_DIR = "final_model"
CONFIG_FILE = "config.json"


def _prepare_workdir(workdir: str, overwrite: bool) -> None:
  """Refuses a workdir holding an earlier run unless told to overwrite."""
  os.makedirs(workdir, exist_ok=True)
  earlier = [
    p
    for p in (results_lib.RESULTS_FILE, FINAL_MODEL_DIR)
    if os.path.exists(os.path.join(workdir, p))
  ]
  if not earlier:
    return
  if not overwrite:
    finished = FINAL_MODEL_DIR in earlier
    raise FileExistsError(
      f"workdir {workdir!r} already holds {'a finished' if finished else 'an unfinished'} "
      f"run ({', '.join(earlier)}); "
      "choose another workdir, or set overwrite=True (--config.overwrite=True) to replace it"
    )
  for p in earlier + [CONFIG_FILE, results_lib.PLOT_FILE]:
    path = os.path.join(workdir, p)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


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


def _check_finite(losses: np.ndarray, round_name: str, start_step: int) -> None:
  bad = np.argwhere(~np.isfinite(losses))
  if bad.size:
    step, particle = bad[0]
    raise FloatingPointError(
      f"training diverged: loss {losses[step, particle]} in {round_name} at step "
      f"{start_step + int(step)}, particle {int(particle)}"
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


def run(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  optimizer: optimizers.OptimizerFactory | optax.GradientTransformation | None = None,
) -> results_lib.SwampResult:
  """Runs SWAMP as configured and returns its per-round results and final model.

  Args:
    config: a config from ``get_default_config()`` or ``configs/*.py``.
      ``num_particles=1`` with ``swa.enabled=False`` is IMP; with SWA,
      IMP+SWA; ``swa.enabled=False`` with N > 1 is SWAMP without SWA;
      ``single_particle_rounds=k`` is SWAMP+.
    workdir: where to write ``results.jsonl`` (one line per round, as each
      round ends), ``config.json``, the accuracy-vs-sparsity plot and the
      final averaged model and mask (orbax). None writes nothing.
    optimizer: a custom optax optimizer, as ``schedule -> transform`` (it
      gets SWAMP's learning-rate schedule, resumed at the rewind step each
      round) or a fixed ``optax.GradientTransformation``. It is wrapped with
      ``optimizers.masked``; None builds ``config.optimizer``.

  Returns:
    A ``SwampResult``.

  Raises:
    ValueError: a config field is unknown or out of range, or the model or
      dataset name is unknown.
    FileExistsError: ``workdir`` holds an earlier run and not ``overwrite``.
    FloatingPointError: a particle's loss became NaN or inf.
  """
  config_lib.validate_config(config)
  factory = _resolve_optimizer(config, optimizer)
  models.create_model(config.model.name, 10)  # unknown model names fail before any I/O
  if workdir is not None:
    workdir = os.path.abspath(workdir)
    _prepare_workdir(workdir, config.overwrite)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  dataset = data_lib.load_dataset(
    config.dataset.name,
    config.dataset.data_dir,
    config.dataset.validation_size,
    config.dataset.cache_dir or None,
  )
  model = models.create_model(
    config.model.name, dataset.num_classes, config.model.conv_impl, config.model.bn_momentum
  )
  spe = data_lib.steps_per_epoch(len(dataset.train_labels), config.batch_size)
  if spe < 1:
    raise ValueError(
      f"batch_size {config.batch_size} exceeds the {len(dataset.train_labels)} "
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
    dataset.name.startswith("cifar")
    if config.dataset.augment == "auto"
    else config.dataset.augment == "yes"
  )
  spec = particles.StepSpec(
    batch_size=config.batch_size,
    num_examples=len(dataset.train_labels),
    augment=augment,
    swa_start_step=end_step + 1 if swa_start is None else swa_start,
    swa_every_steps=max(1, config.swa.every_epochs) * spe,
  )

  variables = model.init(
    imp.init_key(config.seed), jnp.zeros((1, *dataset.image_shape), jnp.float32), train=False
  )
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  prunable = masking.compute_prunable(params, config.prune_exclude)
  settings = imp.RoundSettings(
    prune_fraction=config.prune_fraction,
    bn_recompute=config.bn_recompute.enabled,
    bn_batch_size=config.batch_size,
    bn_num_batches=config.bn_recompute.num_batches,
    eval_batch_size=config.eval_batch_size,
  )
  train_data = particles.DeviceData(
    jnp.asarray(dataset.train_images),
    jnp.asarray(dataset.train_labels),
    jnp.asarray(dataset.mean),
    jnp.asarray(dataset.std),
  )
  eval_data = imp.EvalData(
    *(
      jnp.asarray(a)
      for a in (
        dataset.test_images,
        dataset.test_labels,
        dataset.validation_images,
        dataset.validation_labels,
      )
    )
  )

  progress = _Progress(
    config.rewind_epochs + (config.num_rounds + 1) * config.epochs_per_round, config.progress
  )
  mask = masking.create_dense_mask(params)
  try:
    # The ticket: dense training to the rewind step T0 (weights and BN stats).
    if rewind_step > 0:
      pre = imp.create_round_programs(
        model,
        optimizers.masked(factory(schedule)),
        particles.StepSpec(spec.batch_size, spec.num_examples, augment, rewind_step + 1, spe),
        prunable,
        settings,
      )
      states = pre.start(params, batch_stats, mask, imp.pretrain_key(config.seed)[None])
      for start, n in imp.epoch_chunks(0, rewind_step, spe):
        states, losses = pre.train(states, mask, train_data, imp.as_step(start), num_steps=n)
        losses = np.asarray(losses)
        _check_finite(losses, "the dense pre-training to the rewind point", start)
        progress.update(n / spe, phase="rewind", loss=f"{losses.mean():.3f}")
      params, batch_stats = jax.tree_util.tree_map(
        lambda x: x[0], (states.params, states.batch_stats)
      )
    ticket = imp.Ticket(params, batch_stats)

    programs = imp.create_round_programs(
      model,
      optimizers.masked(factory(optimizers.offset_schedule(schedule, rewind_step))),
      spec,
      prunable,
      settings,
    )
    rounds = []
    for r in range(config.num_rounds + 1):
      t0 = time.time()
      n_particles = config_lib.num_particles_in_round(config, r)
      keys = jnp.stack([imp.particle_key(config.seed, r, n) for n in range(n_particles)])
      states = programs.start(ticket.params, ticket.batch_stats, mask, keys)
      for start, n in imp.epoch_chunks(rewind_step, end_step, spe):
        states, losses = programs.train(states, mask, train_data, imp.as_step(start), num_steps=n)
        losses = np.asarray(losses)
        _check_finite(losses, f"round {r}", start)
        progress.update(
          n / spe,
          round=r,
          epoch=(start + n - rewind_step) // spe,
          loss=" ".join(f"{v:.3f}" for v in losses.mean(0)),
        )
      out = programs.finish(states, mask, train_data, eval_data)
      remaining, total = masking.count_prunable(mask, prunable)
      result = results_lib.RoundResult.from_metrics(
        r, int(remaining), total, n_particles, jax.device_get(out.metrics), time.time() - t0
      )
      rounds.append(result)
      progress.write(
        f"round {r}: sparsity {100 * result.sparsity:.2f}%  "
        f"average {100 * result.test_accuracy:.2f}%"
        f"  particles {' '.join(f'{100 * a:.2f}' for a in result.particle_test_accuracy)}"
      )
      if workdir is not None:
        results_lib.append_result(workdir, result)
      final = (out.params, out.batch_stats, mask)
      mask = out.next_mask
  finally:
    progress.close()

  params, batch_stats, mask = jax.device_get(final)
  outcome = results_lib.SwampResult(rounds, params, batch_stats, mask, workdir)
  print(outcome.table(), flush=True)
  if workdir is not None:
    results_lib.plot_accuracy_vs_sparsity(
      rounds,
      os.path.join(workdir, results_lib.PLOT_FILE),
      f"{config.model.name} on {config.dataset.name}, N={config.num_particles}",
    )
    save_final_model(os.path.join(workdir, FINAL_MODEL_DIR), params, batch_stats, mask)
  return outcome


def save_final_model(path: str, params, batch_stats, mask) -> None:
  """Saves the averaged model and its mask with orbax (one pytree)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": params, "batch_stats": batch_stats, "mask": mask})


def load_final_model(path: str) -> dict:
  """Restores ``{'params', 'batch_stats', 'mask'}`` saved by ``run``."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path))
