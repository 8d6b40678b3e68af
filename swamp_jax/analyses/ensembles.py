"""Ensembles of K models at one sparsity: the mean of their softmax outputs.

The paper's claim 2 compares SWAMP's single averaged model with an ensemble
of two independent IMP solutions at the same sparsity (K times the inference
cost). Members are stacked like particles: every leaf has a leading
[K, ...] axis, so a round's saved ``particle_params`` is already an ensemble.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import evaluation, saved_runs
from swamp_jax import workdir as workdir_lib


def stack_members(trees):
  """Stacks K pytrees of one structure into one with leaves [K, ...]."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def compute_member_probabilities(model, params, batch_stats, images, mean, std, batch_size: int):
  """Each member's softmax outputs in inference mode.

  Args:
    model: the Flax module shared by the members (hashable; static).
    params, batch_stats: the members, leaves [K, ...] (``batch_stats`` may be
      an empty collection for a model without BatchNorm).
    images: stored images [n, H, W, C]; ``mean``, ``std``: per channel [C].

  Returns:
    float32 [K, n, num_classes]. Members are evaluated one after another
    (``lax.map``), so memory does not grow with K.
  """

  def member(variables):
    p, bs = variables
    return evaluation.compute_probabilities(
      model, {"params": p, "batch_stats": bs}, images, mean, std, batch_size
    )

  return jax.lax.map(member, (params, batch_stats))


@jax.jit
def compute_ensemble_and_member_metrics(probabilities, labels) -> dict:
  """Metrics of the ensemble and of each member from members' probabilities.

  Args:
    probabilities: [K, n, num_classes]; labels: int32 [n].

  Returns:
    ``{'loss', 'accuracy'}`` scalars of the mean of the K softmax outputs,
    and ``{'member_losses', 'member_accuracies'}`` [K], computed with the
    same formula on each member alone (so K=1 gives the member's metrics).
  """
  metrics = evaluation.compute_ensemble_metrics(probabilities, labels)
  members = jax.vmap(lambda p: evaluation.compute_ensemble_metrics(p[None], labels))(probabilities)
  metrics["member_losses"] = members["loss"]
  metrics["member_accuracies"] = members["accuracy"]
  return metrics


def evaluate_ensemble(
  model, params, batch_stats, images, labels, mean, std, batch_size: int = 1000
) -> dict:
  """Loss and accuracy of the ensemble of stacked members on ``(images, labels)``.

  Args:
    params, batch_stats: leaves [K, ...] (see ``stack_members``).
    images: stored images [n, H, W, C]; labels: int32 [n].

  Returns:
    ``compute_ensemble_and_member_metrics``'s dict (device arrays).
  """
  probabilities = compute_member_probabilities(
    model, params, batch_stats, jnp.asarray(images), jnp.asarray(mean), jnp.asarray(std), batch_size
  )
  return compute_ensemble_and_member_metrics(probabilities, jnp.asarray(labels))


def _count_kept(mask) -> int:
  return int(sum(np.sum(m) for m in jax.tree_util.tree_leaves(mask)))


def evaluate_ensemble_of_runs(
  workdirs: list[str],
  round_index: int,
  dataset,
  model,
  split: str = "test",
  batch_size: int = 1000,
) -> dict:
  """The ensemble of several runs' averaged models of one round.

  Each run's round-``round_index`` model is read with
  ``workdir_lib.load_round_model``; at a given round every run of one config has
  the same number of surviving weights, which is checked.

  Args:
    workdirs: K run directories (the same model; e.g. IMP with K seeds).
    round_index: the round (0 dense, r after r prunes).
    dataset, model: as the runs built them (``saved_runs.load_run``).
    split: 'test', 'validation' or 'train'.

  Returns:
    ``{'loss': float, 'accuracy': float, 'member_accuracies': [K floats],
    'member_losses': [K floats]}``.

  Raises:
    ValueError: no workdirs, or the members' masks keep different numbers of
      weights (they are not at one sparsity).
  """
  if not workdirs:
    raise ValueError("evaluate_ensemble_of_runs needs at least one workdir")
  saved = [workdir_lib.load_round_model(w, round_index) for w in workdirs]
  kept = [_count_kept(s["mask"]) for s in saved]
  if len(set(kept)) > 1:
    raise ValueError(
      f"round {round_index} of {workdirs} keeps {kept} weights: members are not at one sparsity"
    )
  arrays = saved_runs.get_split(dataset, split)
  metrics = evaluate_ensemble(
    model,
    stack_members([s["params"] for s in saved]),
    stack_members([s["batch_stats"] for s in saved]),
    arrays.images,
    arrays.labels,
    dataset.mean,
    dataset.std,
    batch_size,
  )
  metrics = jax.device_get(metrics)
  return {
    "loss": float(metrics["loss"]),
    "accuracy": float(metrics["accuracy"]),
    "member_accuracies": [float(a) for a in metrics["member_accuracies"]],
    "member_losses": [float(a) for a in metrics["member_losses"]],
  }
