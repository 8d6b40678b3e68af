"""Lottery Pools (Yin et al. 2023): interpolate a ticket's solution with other IMP rounds'.

A related baseline of SWAMP's: IMP already produced one solution per
sparsity level; Lottery Pools mixes the target round's solution with the
others', projected onto the target's mask (so the pool is exactly as sparse
and costs nothing at inference), choosing each mixing coefficient greedily on
held-out training data (the dataset's validation split).

Our greedy rule (the choices are ours where the paper's are not pinned down
here): start from the target solution; visit the candidates in the given
order (by default nearest rounds first); for each, evaluate
``(1 - c) * pool + c * candidate`` under the target's mask for every ``c`` in
``coefficients``, with BatchNorm statistics recomputed, and keep the best
point if it beats the current pool on validation accuracy (ties: lower
validation loss). Every evaluation is a point of a
``connectivity.compute_interpolation_metrics`` line.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import averaging, batchnorm, masking, results, saved_runs
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import connectivity

COEFFICIENTS = tuple(float(c) for c in np.round(np.arange(0.05, 1.0, 0.05), 2))


class LotteryPool(NamedTuple):
  """The pooled solution and how it was mixed."""

  params: Any  # under the target's mask
  batch_stats: Any  # recomputed for ``params`` (empty without BN)
  weights: np.ndarray  # [1 + K]: the target's then each candidate's share, summing to 1
  validation_accuracy: float
  validation_loss: float


def _is_better(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """(accuracy, loss) ``a`` beats ``b``: higher accuracy, or equal and lower loss."""
  return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def compute_lottery_pool(
  model,
  target_params,
  candidates: list,
  batch_stats,
  mask,
  dataset,
  coefficients=COEFFICIENTS,
  batch_size: int = 1000,
  bn_batch_size: int = 128,
  bn_num_batches: int = 0,
) -> LotteryPool:
  """Greedy Lottery Pool of ``target_params`` with ``candidates`` on the validation split.

  Args:
    model: the Flax module.
    target_params: the target round's solution (no particle axis).
    candidates: K params pytrees of the same structure, visited in order.
    batch_stats: a BN statistics pytree of the model (structure only).
    mask: the target's mask; every point is projected onto it.
    dataset: a ``datasets.Dataset`` with a non-empty validation split; BN
      statistics come from its training split.
    coefficients: the candidate's share c in (0, 1] tried at each step.

  Returns:
    A ``LotteryPool``; its validation accuracy is never below the target's.
  """
  val = saved_runs.get_split(dataset, "validation")
  alphas = jnp.asarray((0.0, *coefficients), jnp.float32)
  common = dict(
    batch_stats=batch_stats,
    mask=mask,
    alphas=alphas,
    images=val.images,
    labels=val.labels,
    train_images=jnp.asarray(dataset.train_images),
    mean=jnp.asarray(dataset.mean),
    std=jnp.asarray(dataset.std),
    batch_size=batch_size,
    bn_batch_size=bn_batch_size,
    bn_num_batches=bn_num_batches,
  )
  pool = masking.apply_mask(target_params, mask)
  weights = np.zeros(1 + len(candidates))
  weights[0] = 1.0
  score = None
  for k, candidate in enumerate(candidates):
    m = jax.device_get(connectivity.compute_interpolation_metrics(model, pool, candidate, **common))
    if score is None:  # alpha = 0 is the pool itself
      score = (float(m["accuracy"][0]), float(m["loss"][0]))
    best = max(range(1, len(alphas)), key=lambda i: (m["accuracy"][i], -m["loss"][i]))
    trial = (float(m["accuracy"][best]), float(m["loss"][best]))
    if _is_better(trial, score):
      c = alphas[best]  # float32, as the point was evaluated
      pool = masking.apply_mask(averaging.interpolate(pool, candidate, c), mask)
      weights = (1.0 - float(c)) * weights
      weights[1 + k] += float(c)
      score = trial
  if score is None:  # no candidates: the target alone
    m = jax.device_get(connectivity.compute_interpolation_metrics(model, pool, pool, **common))
    score = (float(m["accuracy"][0]), float(m["loss"][0]))
  recompute = jax.jit(
    batchnorm.recompute_batch_stats, static_argnames=("model", "batch_size", "num_batches")
  )
  stats = recompute(
    model,
    pool,
    batch_stats,
    common["train_images"],
    common["mean"],
    common["std"],
    batch_size=bn_batch_size,
    num_batches=bn_num_batches,
  )
  return LotteryPool(pool, stats, weights, *score)


def compute_lottery_pool_of_run(
  workdir: str,
  round_index: int,
  candidate_rounds: list[int] | None = None,
  coefficients=COEFFICIENTS,
  dataset=None,
) -> dict:
  """The Lottery Pool of a saved run's round ``round_index``, evaluated on the test split.

  Args:
    workdir: a run with a validation split (``dataset.validation_size > 0``).
    candidate_rounds: rounds whose averaged solutions may join, in the order
      visited; None: every other saved round, nearest first (ties: the
      denser one first).
    dataset: the ``Dataset`` of a run trained on in-memory arrays.

  Returns:
    ``{'test_accuracy', 'test_loss', 'validation_accuracy'}`` of the pool,
    ``'ticket_test_accuracy'`` and ``'ticket_validation_accuracy'`` of the
    target solution alone (BN recomputed the same way), and ``'weights'``:
    ``{round: share}`` of the rounds in the pool.
  """
  run = saved_runs.load_run(workdir, dataset)
  if candidate_rounds is None:
    rounds = [r.round for r in results.read_results(workdir) if r.round != round_index]
    candidate_rounds = sorted(rounds, key=lambda r: (abs(r - round_index), r))
  target = workdir_lib.load_round_model(workdir, round_index)
  candidates = [workdir_lib.load_round_model(workdir, r)["params"] for r in candidate_rounds]
  settings = dict(
    batch_size=run.config.eval_batch_size,
    bn_batch_size=run.config.batch_size,
    bn_num_batches=run.config.bn_recompute.num_batches,
  )
  pool = compute_lottery_pool(
    run.model,
    target["params"],
    candidates,
    target["batch_stats"],
    target["mask"],
    run.dataset,
    coefficients,
    **settings,
  )
  test = saved_runs.get_split(run.dataset, "test")

  def evaluate(params, split):
    m = connectivity.compute_interpolation_metrics(
      run.model,
      params,
      params,
      target["batch_stats"],
      target["mask"],
      jnp.zeros((1,), jnp.float32),
      split.images,
      split.labels,
      jnp.asarray(run.dataset.train_images),
      jnp.asarray(run.dataset.mean),
      jnp.asarray(run.dataset.std),
      **settings,
    )
    return float(m["accuracy"][0]), float(m["loss"][0])

  test_accuracy, test_loss = evaluate(pool.params, test)
  ticket_val = evaluate(target["params"], saved_runs.get_split(run.dataset, "validation"))
  return {
    "test_accuracy": test_accuracy,
    "test_loss": test_loss,
    "validation_accuracy": pool.validation_accuracy,
    "ticket_test_accuracy": evaluate(target["params"], test)[0],
    "ticket_validation_accuracy": ticket_val[0],
    "weights": {
      r: float(w)
      for r, w in zip([round_index, *candidate_rounds], pool.weights, strict=True)
      if w > 0
    },
  }
