import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from swamp_jax import datasets
from swamp_jax.analyses import flatness

from . import equivalence
from .saved_runs_for_analyses import get_saved_run

KEY = jax.random.key(0)


def _diagonal_quadratic(a):
  return lambda w: 0.5 * sum(jnp.sum(a[k] * w[k] ** 2) for k in w)


def _diagonal_problem():
  rng = np.random.default_rng(0)
  a = {"x": jnp.asarray(rng.uniform(0.5, 3.0, 5)), "y": jnp.asarray(rng.uniform(0, 2, (2, 3)))}
  w = {"x": jnp.ones(5), "y": jnp.full((2, 3), -2.0)}
  return a, w


def test_diagonal_hessian_trace_is_exact_with_rademacher_probes():
  a, w = _diagonal_problem()
  out = flatness.compute_hessian_trace(_diagonal_quadratic(a), w, None, KEY, num_probes=8)
  exact = float(sum(jnp.sum(v) for v in a.values()))
  np.testing.assert_allclose(out.estimates, exact, rtol=1e-6)
  assert float(out.stderr) == pytest.approx(0.0, abs=1e-5)


def test_masked_coordinates_contribute_nothing():
  a, w = _diagonal_problem()
  mask = {"x": jnp.arange(5) % 2 == 0, "y": jnp.asarray([[True, False, True], [False] * 3])}
  out = flatness.compute_hessian_trace(_diagonal_quadratic(a), w, mask, KEY, num_probes=4)
  kept = float(sum(jnp.sum(jnp.where(mask[k], a[k], 0)) for k in a))
  np.testing.assert_allclose(out.estimates, kept, rtol=1e-6)
  # Huge curvature (and coupling) on pruned coordinates changes nothing.
  coupled = lambda w: _diagonal_quadratic(a)(w) + 1e3 * (w["x"][1] * w["y"][1, 1]) ** 2  # noqa: E731
  again = flatness.compute_hessian_trace(coupled, w, mask, KEY, num_probes=4)
  np.testing.assert_array_equal(again.estimates, out.estimates)


def test_trace_of_a_dense_quadratic_is_within_three_standard_errors():
  rng = np.random.default_rng(1)
  b = rng.normal(size=(12, 12))
  hessian = jnp.asarray(b @ b.T + np.diag(rng.uniform(0, 5, 12)), jnp.float32)
  loss = lambda w: 0.5 * w["w"] @ hessian @ w["w"]  # noqa: E731
  w = {"w": jnp.asarray(rng.normal(size=12), jnp.float32)}
  v = {"w": jnp.asarray(rng.choice([-1.0, 1.0], 12), jnp.float32)}
  hv = flatness.compute_hessian_vector_product(loss, w, v)
  # Autodiff's two 12-term products in sequence vs one matmul (tests/equivalence.py).
  expected = hessian @ v["w"]
  scale = float(np.abs(hessian).max()) * 12  # the terms' scale: |H_ij v_j| summed over j
  equivalence.assert_close_normwise(
    hv["w"], expected, equivalence.training_rtol(1, 12, 2), scale=scale
  )
  out = flatness.compute_hessian_trace(loss, w, None, KEY, num_probes=200)
  assert float(out.stderr) > 0  # off-diagonal terms make probes disagree
  assert abs(float(out.mean) - float(jnp.trace(hessian))) < 3 * float(out.stderr)


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.tanh(nn.Dense(4)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def test_training_loss_trace_matches_the_exact_hessian_of_a_small_model():
  dataset = datasets.Dataset.from_digits()
  model = TinyMLP()
  params = model.init(KEY, jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  images, labels = flatness.create_training_batches(
    dataset.train_images, dataset.train_labels, 64, 3
  )
  assert images.shape == (3, 64, 8, 8, 1) and labels.shape == (3, 64)
  mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
  flat, unravel = ravel_pytree(params)
  loss = lambda f: flatness.compute_training_loss(  # noqa: E731
    model, unravel(f), {}, images, labels, mean, std
  )
  exact = float(jnp.trace(jax.jit(jax.hessian(loss))(flat)))
  out = flatness.compute_training_hessian_trace(
    model, params, {}, None, images, labels, mean, std, jax.random.key(3), 100
  )
  assert abs(float(out.mean) - exact) < 3 * float(out.stderr)
  assert float(out.stderr) < 0.2 * abs(exact)  # the check above has teeth


def test_trace_of_a_saved_round_is_deterministic_and_per_solution(tmp_path_factory):
  workdir = get_saved_run("swamp", tmp_path_factory)
  kwargs = dict(num_probes=4, num_batches=2, seed=5)
  average = flatness.compute_round_hessian_trace(workdir, 1, **kwargs)
  assert np.isfinite(average["trace"]) and average["stderr"] > 0
  assert flatness.compute_round_hessian_trace(workdir, 1, **kwargs) == average
  particle = flatness.compute_round_hessian_trace(workdir, 1, particle=0, **kwargs)
  assert particle["trace"] != average["trace"]
  kernels = flatness.compute_round_hessian_trace(workdir, 1, prunable_only=True, **kwargs)
  assert kernels["trace"] != average["trace"]
