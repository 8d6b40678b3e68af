"""A run's directory: what it holds, refusing finished runs, saving and loading models.

Layout: ``results.jsonl`` (one line per round), ``config.json``,
``accuracy_vs_sparsity.png``, ``checkpoints/`` (orbax, for resuming),
``ticket/``, ``round_models/round_XXX/`` (each round's averaged model, mask
and particle solutions, for the analyses) and ``final_model/``.
"""

from __future__ import annotations

import os
import shutil

from swamp_jax import checkpointing, imp
from swamp_jax import results as results_lib

FINAL_MODEL_DIR = "final_model"
ROUND_MODELS_DIR = "round_models"
TICKET_DIR = "ticket"
CONFIG_FILE = "config.json"


def prepare_workdir(workdir: str, overwrite: bool, primary: bool = True) -> None:
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
  save_tree(round_model_path(workdir, round_index), tree)


def load_round_model(workdir: str, round_index: int) -> dict:
  """Restores what ``save_round_model`` wrote for ``round_index``."""
  return load_final_model(round_model_path(workdir, round_index))


def save_tree(path: str, tree) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=True)


def save_final_model(path: str, params, batch_stats, mask) -> None:
  """Saves the averaged model and its mask with orbax (one pytree)."""
  save_tree(path, {"params": params, "batch_stats": batch_stats, "mask": mask})


def load_final_model(path: str) -> dict:
  """Restores ``{'params', 'batch_stats', 'mask'}`` saved by ``run``."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path))
