"""A run's directory: what it holds, refusing finished runs, saving and loading models.

Layout: ``results.jsonl`` (one line per round), ``config.json``,
``accuracy_vs_sparsity.png``, ``checkpoints/`` (orbax, for resuming),
``ticket/``, ``round_models/round_XXX/`` (each round's averaged model, mask
and particle solutions, for the analyses) and ``final_model/``; ``.lock``
(held while a run uses the directory) and ``diverged.txt`` (why the last
attempt stopped, while it stands).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time

import jax

from swamp_jax import checkpointing, imp
from swamp_jax import results as results_lib

FINAL_MODEL_DIR = "final_model"
ROUND_MODELS_DIR = "round_models"
TICKET_DIR = "ticket"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
DIVERGED_FILE = "diverged.txt"


class WorkdirInUseError(RuntimeError):
  """Another process is running in this workdir."""


def check_workdir_path(workdir: str) -> None:
  """Raises FileExistsError if ``workdir`` exists and is not a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"workdir {workdir!r} is a file, not a directory; choose another workdir")


def lock_workdir(workdir: str):
  """Creates ``workdir`` and takes its lock for as long as the returned file is open.

  The lock is ``flock`` on ``workdir/.lock``: the kernel releases it when the
  process ends, however it ends (a SIGKILLed run leaves no stale lock). It
  holds on a local filesystem (and NFS with working locks); on an object
  store mounted as a filesystem it covers only one machine's processes.

  Raises:
    WorkdirInUseError: another process holds it (named in the message).
  """
  os.makedirs(workdir, exist_ok=True)
  f = open(os.path.join(workdir, LOCK_FILE), "a+")  # noqa: SIM115 - held past this function
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise WorkdirInUseError(
      f"workdir {workdir!r} is in use by {holder}; wait for that run to end (or stop it), "
      "or choose another workdir"
    ) from None
  f.seek(0)
  f.truncate()
  f.write(
    f"process {os.getpid()} on {socket.gethostname()} "
    f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
  )
  f.flush()
  return f


def remove_if_unused(workdir: str) -> None:
  """Removes a workdir that a failed run created and left without a checkpoint."""
  checkpoints = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if os.path.isdir(checkpoints) and any(p.isdigit() for p in os.listdir(checkpoints)):
    return
  shutil.rmtree(workdir, ignore_errors=True)


def record_divergence(workdir: str, message: str) -> None:
  with open(os.path.join(workdir, DIVERGED_FILE), "w") as f:
    f.write(message + "\n")


def read_divergence(workdir: str) -> str | None:
  """Why the last attempt in ``workdir`` diverged, or None if it did not."""
  path = os.path.join(workdir, DIVERGED_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip()


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
    DIVERGED_FILE,
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


def restore_files(
  workdir: str, point: checkpointing.ResumePoint, primary: bool = True, resumed: bool = True
) -> None:
  """Rewrites what a resumed run can derive from its checkpoint; names what it cannot.

  ``results.jsonl`` is rewritten from the checkpoint's finished rounds (a
  torn, cut or deleted file is repaired) by the primary process; a missing
  ``ticket/`` is saved again (by every process: orbax saves are collective).
  Past rounds' models are not in the checkpoint: missing ones are named in a
  warning (the analyses that need them fail naming them too). A run that starts
  fresh at the rewind point (``resumed=False``, ``rewind_epochs=0``) writes its
  ticket, the initialization, here without a warning.
  """
  if primary:
    path = os.path.join(workdir, results_lib.RESULTS_FILE)
    if point.results:
      results_lib.write_results(workdir, [results_lib.RoundResult(**d) for d in point.results])
    elif os.path.exists(path):
      os.remove(path)  # no round finished yet: anything there is a torn first line
  ticket_dir = os.path.join(workdir, TICKET_DIR)
  if point.phase != checkpointing.PRETRAIN_PHASE and not os.path.isdir(ticket_dir):
    if resumed:
      logging.warning("%s was missing; rewriting it from the checkpoint", ticket_dir)
    save_tree(ticket_dir, point.ticket._asdict())
  missing = [
    d["round"] for d in point.results if not os.path.isdir(round_model_path(workdir, d["round"]))
  ]
  if missing and primary:
    logging.warning(
      "the saved models of finished rounds %s are missing from %s: they are not in the "
      "checkpoints and cannot be rewritten; analyses of these rounds will fail (rerun with "
      "--config.overwrite=True, or in a new workdir, to get them back)",
      missing,
      os.path.join(workdir, ROUND_MODELS_DIR),
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
  """Restores what ``save_round_model`` wrote for ``round_index``, on this process's devices.

  Raises:
    FileNotFoundError: the round's model is not there (naming the rounds that are).
  """
  path = round_model_path(workdir, round_index)
  if not os.path.isdir(path):
    parent = os.path.join(workdir, ROUND_MODELS_DIR)
    saved = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    raise FileNotFoundError(
      f"the model of round {round_index} is not in {parent!r} (saved: {saved or 'none'}); "
      "a round's model is written when the round ends, is not kept in the checkpoints, and "
      "cannot be rebuilt once deleted (rerun the run in a new workdir to get it)"
    )
  return load_tree(path)


def save_tree(path: str, tree) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=True)


def save_final_model(path: str, params, batch_stats, mask) -> None:
  """Saves the averaged model and its mask with orbax (one pytree)."""
  save_tree(path, {"params": params, "batch_stats": batch_stats, "mask": mask})


def load_tree(path: str) -> dict:
  """Restores a tree saved by ``save_tree`` onto this process's first device.

  The target is built from the saved shapes and dtypes, so a tree saved from
  arrays sharded over any number of devices loads on one (orbax alone refuses
  a topology it did not save from).
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} does not exist (or is not a directory)")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
    target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved
    )
    return checkpointer.restore(path, target)


def load_final_model(path: str) -> dict:
  """Restores ``{'params', 'batch_stats', 'mask'}`` saved by ``run``, on any device count."""
  return load_tree(path)
