"""Linear mode connectivity: loss and accuracy along the line between two solutions.

The paper's claim 3: no loss barrier on the straight line between particles
of one round, nor between SWAMP solutions of successive rounds. A point of
the line is ``apply_mask(interpolate(a, b, alpha), mask)``; BatchNorm
statistics are recomputed for every point (as for the particle average:
neither endpoint's statistics describe the activations in between), and
skipped for a model without BatchNorm.

Which mask between rounds: round r+1's mask is a subset of round r's, so
both w_r and w_{r+1} lie in mask r and the whole line does too. We
therefore interpolate under mask r by default (the endpoints are the two
trained solutions as they are). ``compute_round_connectivity`` can instead
project both onto mask r+1 (``mask_from='later'``): then alpha=0 is w_r
after the pruning that produced round r+1's mask, not the trained w_r.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import averaging, batchnorm, evaluation, masking, saved_runs
from swamp_jax import workdir as workdir_lib

NUM_ALPHAS = 11


def create_alphas(num_alphas: int = NUM_ALPHAS) -> np.ndarray:
  """``num_alphas`` (>= 2) evenly spaced float32 points of [0, 1], both ends included."""
  if num_alphas < 2:
    raise ValueError(f"num_alphas must be >= 2 (the two endpoints), got {num_alphas}")
  return np.linspace(0.0, 1.0, num_alphas, dtype=np.float32)


@functools.partial(
  jax.jit, static_argnames=("model", "batch_size", "bn_batch_size", "bn_num_batches")
)
def compute_interpolation_metrics(
  model,
  params_a,
  params_b,
  batch_stats,
  mask,
  alphas,
  images,
  labels,
  train_images,
  mean,
  std,
  *,
  batch_size: int,
  bn_batch_size: int,
  bn_num_batches: int,
) -> dict:
  """Loss and accuracy at each point ``(1 - alpha) * a + alpha * b`` under ``mask``.

  Args:
    model: the Flax module (static).
    params_a, params_b: the endpoints, no particle axis.
    batch_stats: a BatchNorm statistics pytree of the model (only its
      structure is used: statistics are recomputed at every point from
      ``train_images``); an empty collection for a model without BN.
    mask: bool pytree like the params, or None for no projection.
    alphas: float32 [A].
    images, labels: the split evaluated, [n, H, W, C] and int32 [n].
    train_images: stored training images for the BN recompute.
    mean, std: per-channel [C] normalization.
    bn_batch_size, bn_num_batches: as ``batchnorm.recompute_batch_stats``.

  Returns:
    ``{'loss': [A], 'accuracy': [A]}`` float32. Points are evaluated one
    after another (``lax.map``), so memory does not grow with A.
  """

  def at(alpha):
    params = averaging.interpolate(params_a, params_b, alpha)
    if mask is not None:
      params = masking.apply_mask(params, mask)
    stats = batchnorm.recompute_batch_stats(
      model, params, batch_stats, train_images, mean, std, bn_batch_size, bn_num_batches
    )
    variables = {"params": params, "batch_stats": stats}
    return evaluation.compute_metrics(model, variables, images, labels, mean, std, batch_size)

  return jax.lax.map(at, alphas)


def compute_barrier(alphas, values, higher_is_better: bool = False) -> float:
  """Height of the barrier of ``values`` along the line.

  The largest excess over the straight line between the endpoint values:
  ``max_alpha values(alpha) - ((1 - alpha) values(0) + alpha values(1))``
  for a loss; for an accuracy (``higher_is_better``), the largest drop below
  that line. Zero when the endpoints are the highest (loss) points; never
  negative, as the endpoints themselves contribute 0.

  Args:
    alphas: [A], increasing, from 0 to 1 inclusive.
    values: [A], the metric at each alpha.
  """
  alphas, values = np.asarray(alphas, np.float64), np.asarray(values, np.float64)
  if alphas[0] != 0.0 or alphas[-1] != 1.0 or np.any(np.diff(alphas) <= 0):
    raise ValueError(f"alphas must increase from 0 to 1 inclusive, got {alphas}")
  if higher_is_better:
    values = -values
  line = (1.0 - alphas) * values[0] + alphas * values[-1]
  return float(np.max(values - line))


def compute_linear_connectivity(
  model,
  params_a,
  params_b,
  batch_stats,
  mask,
  dataset,
  split: str = "test",
  num_alphas: int = NUM_ALPHAS,
  batch_size: int = 1000,
  bn_batch_size: int = 128,
  bn_num_batches: int = 0,
) -> dict:
  """The path between two solutions on one split of ``dataset``, with its barriers.

  Args:
    dataset: a ``datasets.Dataset``; BN statistics come from its training split.
    split: 'test', 'validation' or 'train'.
    Others as ``compute_interpolation_metrics``.

  Returns:
    ``{'alphas': [A], 'loss': [A], 'accuracy': [A]}`` numpy arrays and
    ``'loss_barrier'``, ``'accuracy_barrier'`` floats (``compute_barrier``).
  """
  arrays = saved_runs.get_split(dataset, split)
  alphas = create_alphas(num_alphas)
  metrics = compute_interpolation_metrics(
    model,
    params_a,
    params_b,
    batch_stats,
    mask,
    jnp.asarray(alphas),
    arrays.images,
    arrays.labels,
    jnp.asarray(dataset.train_images),
    jnp.asarray(dataset.mean),
    jnp.asarray(dataset.std),
    batch_size=batch_size,
    bn_batch_size=bn_batch_size,
    bn_num_batches=bn_num_batches,
  )
  loss, accuracy = np.asarray(metrics["loss"]), np.asarray(metrics["accuracy"])
  return {
    "alphas": alphas,
    "loss": loss,
    "accuracy": accuracy,
    "loss_barrier": compute_barrier(alphas, loss),
    "accuracy_barrier": compute_barrier(alphas, accuracy, higher_is_better=True),
  }


def _run_settings(run: saved_runs.SavedRun) -> dict:
  c = run.config
  return {
    "batch_size": c.eval_batch_size,
    "bn_batch_size": c.batch_size,
    "bn_num_batches": c.bn_recompute.num_batches,
  }


def compute_particle_connectivity(
  workdir: str,
  round_index: int,
  particles: tuple[int, int] = (0, 1),
  split: str = "test",
  num_alphas: int = NUM_ALPHAS,
  dataset=None,
) -> dict:
  """The path between two particles' solutions of one round of a saved run.

  Both lie in the round's mask, which is applied (a no-op on the line).
  Needs a run saved with ``save_particles`` and at least two particles in
  that round. ``dataset``: the ``Dataset`` of a run trained on in-memory
  arrays (``saved_runs.load_run``). Returns ``compute_linear_connectivity``'s
  dict.
  """
  run = saved_runs.load_run(workdir, dataset)
  saved = workdir_lib.load_round_model(workdir, round_index)
  if "particle_params" not in saved:
    raise ValueError(f"{workdir!r} saved no particle solutions (config.save_particles=False)")
  count = jax.tree_util.tree_leaves(saved["particle_params"])[0].shape[0]
  i, j = particles
  if not (0 <= i < count and 0 <= j < count):
    raise ValueError(f"round {round_index} of {workdir!r} has {count} particles, asked {particles}")
  take = lambda tree, k: jax.tree_util.tree_map(lambda x: x[k], tree)  # noqa: E731
  return compute_linear_connectivity(
    run.model,
    take(saved["particle_params"], i),
    take(saved["particle_params"], j),
    saved["batch_stats"],
    saved["mask"],
    run.dataset,
    split,
    num_alphas,
    **_run_settings(run),
  )


def compute_round_connectivity(
  workdir: str,
  round_index: int,
  mask_from: str = "earlier",
  split: str = "test",
  num_alphas: int = NUM_ALPHAS,
  dataset=None,
) -> dict:
  """The path from round r's averaged solution (alpha=0) to round r+1's (alpha=1).

  Args:
    mask_from: 'earlier' interpolates under round r's mask (both solutions
      as trained; see the module docstring); 'later' projects both onto
      round r+1's mask, so alpha=0 is w_r pruned to round r+1's sparsity.
    dataset: the ``Dataset`` of a run trained on in-memory arrays.

  Returns:
    ``compute_linear_connectivity``'s dict.
  """
  if mask_from not in ("earlier", "later"):
    raise ValueError(f"mask_from must be 'earlier' or 'later', got {mask_from!r}")
  run = saved_runs.load_run(workdir, dataset)
  a = workdir_lib.load_round_model(workdir, round_index)
  b = workdir_lib.load_round_model(workdir, round_index + 1)
  mask = a["mask"] if mask_from == "earlier" else b["mask"]
  return compute_linear_connectivity(
    run.model,
    a["params"],
    b["params"],
    a["batch_stats"],
    mask,
    run.dataset,
    split,
    num_alphas,
    **_run_settings(run),
  )
