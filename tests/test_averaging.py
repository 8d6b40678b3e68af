import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax import averaging, swa
from swamp_jax.config import count_swa_snapshots, get_default_config, swa_start_epoch

from . import equivalence


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
    # Sums of 4 terms in another order (tests/equivalence.py), relative to their scale.
    equivalence.assert_close_normwise(x, y, equivalence.sum_rtol(4), scale=np.abs(s).max())
    expected = np.mean(np.asarray(s), axis=0)
    equivalence.assert_close_normwise(x, expected, equivalence.sum_rtol(4), scale=np.abs(s).max())


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
  # Steps completed 5, 7, 9 -> steps 4, 6, 8 (0-based); never the start itself.
  assert int(state.count) == 3 == len(collected)
  # A running mean rounds once per update, a sum once per term: 3 terms each way.
  equivalence.assert_close_normwise(
    state.mean["w"],
    np.mean(collected, axis=0),
    equivalence.sum_rtol(2 * 3),
    scale=np.abs(collected).max(),
  )
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


@pytest.mark.parametrize(
  ("epochs", "start", "every", "first_epoch"),
  [(4, 0.75, 1, 4), (10, 0.75, 1, 8), (200, 0.75, 1, 151), (10, 0.5, 2, 7), (100, 0.29, 1, 30)],
)
def test_swa_averages_the_ends_of_the_epochs_after_its_start(epochs, start, every, first_epoch):
  """A round of E epochs with SWA from ``start`` collects E - floor(start * E) epoch ends
  (every ``every``-th), the first one after the start epoch, the last the round's end."""
  c = get_default_config()
  c.epochs_per_round, c.swa.start, c.swa.every_epochs = epochs, start, every
  spe, rewind = 3, 5  # steps per epoch, and a rewind point: global steps start at T0
  s = swa_start_epoch(c)
  assert s == first_epoch - every  # floor, in exact decimal arithmetic (0.29 * 100 -> 29)
  done = [
    step + 1
    for step in range(rewind, rewind + epochs * spe)
    if swa.should_collect(step, rewind + s * spe, every * spe)
  ]
  collected_epochs = [(d - rewind) / spe for d in done]
  assert collected_epochs == list(range(first_epoch, epochs + 1, every))
  assert len(done) == count_swa_snapshots(c) == (epochs - s) // every
  if every == 1:
    assert len(done) == epochs - int(np.floor(start * epochs + 1e-9))
