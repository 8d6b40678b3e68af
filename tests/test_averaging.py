import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import averaging, swa


def _stacked(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": {"kernel": jnp.asarray(rng.normal(size=(n, 5, 3)), jnp.float32)},
    "b": jnp.asarray(rng.normal(size=(n, 7)), jnp.float32),
  }


def test_averaging_identical_particles_is_the_identity():
  single = jax.tree_util.tree_map(lambda x: x[0], _stacked())
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), single)
  out = averaging.average_particles(stacked)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(single), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_averaging_is_permutation_invariant_and_the_uniform_mean():
  stacked = _stacked()
  perm = np.array([2, 0, 3, 1])
  a = averaging.average_particles(stacked)
  b = averaging.average_particles(jax.tree_util.tree_map(lambda x: x[perm], stacked))
  for x, y, s in zip(
    jax.tree_util.tree_leaves(a),
    jax.tree_util.tree_leaves(b),
    jax.tree_util.tree_leaves(stacked),
    strict=True,
  ):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x, np.mean(np.asarray(s), axis=0), rtol=1e-6, atol=1e-7)


def test_swa_running_mean_equals_mean_of_collected_weights():
  rng = np.random.default_rng(1)
  weights = [{"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)} for _ in range(9)]
  state = swa.init_swa(weights[0])
  collected = []
  for step, w in enumerate(weights):
    collect = swa.should_collect(step, swa_start_step=3, swa_every_steps=2)
    if collect:
      collected.append(np.asarray(w["w"]))
    state = swa.update_swa(state, w, collect)
  # Steps completed 3, 5, 7, 9 -> steps 2, 4, 6, 8 (0-based).
  assert int(state.count) == 4 == len(collected)
  np.testing.assert_allclose(state.mean["w"], np.mean(collected, axis=0), rtol=1e-6)
  solution = swa.compute_swa_solution(state, weights[-1])
  np.testing.assert_allclose(solution["w"], state.mean["w"])


def test_swa_solution_is_last_weights_when_nothing_collected():
  w = {"w": jnp.arange(3.0)}
  state = swa.init_swa(w)
  np.testing.assert_array_equal(swa.compute_swa_solution(state, w)["w"], w["w"])


def test_interpolate_endpoints():
  a, b = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  np.testing.assert_allclose(averaging.interpolate(a, b, 0.0)["w"], 0.0)
  np.testing.assert_allclose(averaging.interpolate(a, b, 1.0)["w"], 1.0)
  np.testing.assert_allclose(averaging.interpolate(a, b, 0.25)["w"], 0.25)
