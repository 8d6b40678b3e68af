"""Preemption-safe checkpoints of a whole run, with orbax's CheckpointManager.

A checkpoint is the complete state at a *resume point*: the phase (-1 while
training the dense network to the rewind step, else the IMP round), the next
global step, the ticket, the mask, every particle's state (weights, BN
statistics, optimizer and SWA state, data-order key), and the per-round
results so far. Everything else a step needs is a pure function of these, so
a resumed run replays exactly the computation an uninterrupted one does.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a checkpoint half-written by a kill is never seen. Every array's
digest (``integrity``) is written with it and checked after restoring, so
damage inside a data file that still decodes is caught too. A checkpoint
that fails to restore, or to match its digests, is moved aside and the
previous one used; one from a
run whose math differs (model, num_particles, prune_fraction, ...) is refused
with an error naming the fields, and left where it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from swamp_jax import config as config_lib
from swamp_jax import integrity

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_SUFFIX = "-unrestorable"
FORMAT_VERSION = 1
PRETRAIN_PHASE = -1

# Config fields that may change between a run and its resumption: they do not
# change what is computed (only logging, storage and evaluation batching).
NON_MATH_FIELDS = frozenset(
  {
    "progress",
    "overwrite",
    "eval_batch_size",
    "dataset.data_dir",
    "dataset.cache_dir",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "save_particles",
    "epochs_per_call",
    # The math is the same on any mesh (up to float reassociation), so a run
    # may resume on another device count.
    "mesh.particle_axis",
    "mesh.data_axis",
    # Streamed and in-device batches are the same examples in the same orders.
    "dataset.pipeline",
    "dataset.stream_workers",
  }
)


class ResumePoint(NamedTuple):
  """The run state at a checkpoint (``particles`` leaves are [N, ...])."""

  phase: int  # PRETRAIN_PHASE, or the round index
  step: int  # the next global step to train
  ticket: Any  # imp.Ticket (the initial weights while in PRETRAIN_PHASE)
  mask: Any
  particles: Any  # particles.ParticleState
  results: list  # RoundResult dicts of the finished rounds


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a run whose math differs from this config."""


def progress_step(phase: int, step: int, rewind_step: int, end_step: int) -> int:
  """A checkpoint id that grows monotonically over the whole run: steps trained so far."""
  if phase == PRETRAIN_PHASE:
    return step
  return rewind_step + phase * (end_step - rewind_step) + (step - rewind_step)


def _flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  flat = {}
  for key in config:
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def math_config(config: ml_collections.ConfigDict) -> dict:
  """The config fields that determine the computation, flattened to 'a.b' keys."""
  return {k: v for k, v in _flatten_config(config).items() if k not in NON_MATH_FIELDS}


def compare_configs(saved: dict, current: dict) -> list[str]:
  """Descriptions of the math fields that differ ('field: saved -> current').

  A field the checkpoint lacks was written before the field existed, so the
  run had its default behaviour (as ``saved_runs.load_config`` reads old
  configs): it is compared as its default.
  """
  defaults = math_config(config_lib.get_default_config())
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a = saved.get(key, defaults.get(key, "<absent>"))
    b = current.get(key, "<absent>")
    if a != b:
      diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
  return diffs


def create_manager(workdir: str, keep: int):
  """An orbax CheckpointManager under ``workdir/checkpoints`` keeping ``keep`` (>= 2)."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=max(2, keep),
    enable_async_checkpointing=True,
    create=True,
    cleanup_tmp_directories=True,  # leftovers of a killed write
  )
  return ocp.CheckpointManager(
    os.path.join(workdir, CHECKPOINT_DIR), options=options, item_names=("state", "meta")
  )


# One program copies the whole state (on its devices, in its shardings): copying leaf by leaf
# compiles a program for every leaf shape, again in every process that saves.
_copy_tree = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


def _copy_arrays(tree):
  arrays = [isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(tree)]
  if not all(arrays):  # host values (tests, tools) are saved as they are
    return jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
  return _copy_tree(tree)


def save(manager, point: ResumePoint, config, rewind_step: int, end_step: int) -> None:
  """Saves ``point`` asynchronously.

  The arrays are copied first (on their devices, keeping their shardings),
  so training may donate its buffers while orbax writes.
  """
  import orbax.checkpoint as ocp

  state = {"ticket": point.ticket, "mask": point.mask, "particles": point.particles}
  state = _copy_arrays(state)
  digests, _ = integrity.compute_digests(state)
  meta = {
    "format": FORMAT_VERSION,
    "phase": point.phase,
    "step": point.step,
    "results": point.results,
    "config": math_config(config),
    "digests": digests,
  }
  step_id = progress_step(point.phase, point.step, rewind_step, end_step)
  manager.save(
    step_id,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


def restore_latest(manager, config, abstract_state: Callable[[int], Any]) -> ResumePoint | None:
  """The newest checkpoint that restores, or None when there is none.

  Args:
    manager: from ``create_manager``.
    config: this run's config; a checkpoint of different math is refused.
    abstract_state: phase -> ``{'ticket', 'mask', 'particles'}`` of
      ``jax.ShapeDtypeStruct`` (with shardings) to restore into.

  Raises:
    IncompatibleCheckpointError: the newest readable checkpoint's config
      differs in fields that change the math (named in the message).
    RuntimeError: checkpoints exist but none could be restored.
  """
  import orbax.checkpoint as ocp

  steps = sorted(manager.all_steps(), reverse=True)
  failures, bad_steps = [], []
  current = math_config(config)
  for step_id in steps:
    try:
      meta = manager.restore(step_id, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
      failures.append(f"{step_id}: {type(e).__name__}: {e}")
      bad_steps.append(step_id)
      logging.warning("checkpoint %s is unreadable (%s); trying an older one", step_id, e)
      continue
    if meta.get("format") != FORMAT_VERSION:
      raise IncompatibleCheckpointError(
        f"checkpoint {step_id} in {manager.directory} has format {meta.get('format')!r}, "
        f"this version reads {FORMAT_VERSION}"
      )
    diffs = compare_configs(meta["config"], current)
    if diffs:
      raise IncompatibleCheckpointError(
        f"checkpoint {step_id} in {manager.directory} was written by a run with different "
        "settings: "
        + "; ".join(diffs)
        + ". Use the original config to resume it, another workdir, or overwrite=True "
        "(--config.overwrite=True) to replace it."
      )
    try:
      target = abstract_state(meta["phase"])
      state = manager.restore(
        step_id, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )["state"]
      _check_integrity(state, meta.get("digests"), step_id)
    except Exception as e:  # noqa: BLE001
      failures.append(f"{step_id}: {type(e).__name__}: {e}")
      bad_steps.append(step_id)
      logging.warning("checkpoint %s failed to restore (%s); trying an older one", step_id, e)
      continue
    _quarantine(manager, bad_steps)
    return ResumePoint(
      meta["phase"],
      meta["step"],
      state["ticket"],
      state["mask"],
      state["particles"],
      meta["results"],
    )
  if failures:
    raise RuntimeError(
      f"no checkpoint in {manager.directory} could be restored (they are left in place):\n"
      + "\n".join(failures)
    )
  return None


def _quarantine(manager, steps) -> None:
  """Moves unrestorable checkpoints aside (kept for inspection, out of the run's way)."""
  if not steps:
    return
  directory = os.fspath(manager.directory)
  aside = directory + QUARANTINE_SUFFIX
  os.makedirs(aside, exist_ok=True)
  for step_id in steps:
    target = os.path.join(aside, f"{step_id}-{int(time.time())}")
    shutil.move(os.path.join(directory, str(step_id)), target)
    logging.warning("moved unrestorable checkpoint %s to %s", step_id, target)
  manager.reload()


def _check_integrity(state, saved_digests: dict | None, step_id) -> None:
  """Raises ValueError if a restored array differs from what was saved, or is not finite.

  Reads only the shards each process holds (``integrity.compute_digests``), so
  it works for arrays spanning several processes.
  """
  digests, non_finite = integrity.compute_digests(state)
  if saved_digests is None:
    logging.warning("checkpoint %s has no digests (an older version wrote it)", step_id)
  else:
    changed = integrity.compare_digests(saved_digests, digests)
    if changed:
      raise ValueError(
        f"checkpoint {step_id} is damaged: {len(changed)} arrays differ from what was saved "
        f"(digest mismatch in {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})"
      )
  if non_finite:
    raise ValueError(f"non-finite values in {non_finite[0]} of checkpoint {step_id}")
