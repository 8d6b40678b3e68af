import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from swamp_jax import masking, optimizers


def _setup():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"dense": {"kernel": jax.random.normal(k1, (20, 10)), "bias": jnp.ones((10,))}}
  prunable = masking.compute_prunable(params)
  mask = masking.compute_mask(params, masking.create_dense_mask(params), prunable, 0.6)
  params = masking.apply_mask(params, mask)
  grads = {"dense": {"kernel": jax.random.normal(k2, (20, 10)), "bias": jnp.ones((10,))}}
  return params, grads, mask


TRANSFORMS = {
  "sgd": lambda: optimizers.create_sgd(0.1),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "clip+adamw": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
  "noisy_sgd": lambda: optax.noisy_sgd(0.1, eta=1.0, key=0),
  "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_pruned_weights_stay_zero_under_any_optax_transform(name):
  params, grads, mask = _setup()
  tx = optimizers.masked(TRANSFORMS[name]())
  state = tx.init(params)
  assert isinstance(state, optimizers.MaskedState)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params, mask=mask)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  kernel, keep = np.asarray(params["dense"]["kernel"]), np.asarray(mask["dense"]["kernel"])
  assert np.all(kernel[~keep] == 0.0)
  assert np.any(kernel[keep] != 0.0)
  assert params["dense"]["kernel"].dtype == jnp.float32


def test_masked_state_is_stable_across_steps():
  params, grads, mask = _setup()
  tx = optimizers.masked(optax.adamw(1e-3))
  state = tx.init(params)
  _, new_state = tx.update(grads, state, params, mask=mask)
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(new_state)
  for a, b in zip(
    jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state), strict=True
  ):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_schedule_cosine_to_swa_lr_then_constant_and_resumes_at_rewind():
  schedule = optimizers.create_learning_rate_schedule(0.1, 100, 70, 0.01)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(35)) == pytest.approx(0.01 + 0.09 * 0.5, rel=1e-5)
  for t in (70, 85, 100):
    assert float(schedule(t)) == pytest.approx(0.01)
  resumed = optimizers.offset_schedule(schedule, 10)
  assert float(resumed(0)) == pytest.approx(float(schedule(10)))
  no_swa = optimizers.create_learning_rate_schedule(0.1, 100, None, 0.01, final_learning_rate=0.0)
  assert float(no_swa(100)) == pytest.approx(0.0, abs=1e-8)
  assert float(no_swa(50)) == pytest.approx(0.05, rel=1e-5)


def _values(schedule, steps):
  return np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)))


@pytest.mark.parametrize("swa_start", [None, 14])
def test_zero_warmup_is_the_schedule_without_warmup_bit_for_bit(swa_start):
  # The pre-warm-up schedule, built here from optax directly.
  if swa_start is None:
    expected = optax.cosine_decay_schedule(0.8, 20, alpha=0.1 / 0.8)
  else:
    expected = optax.join_schedules(
      [optax.cosine_decay_schedule(0.8, 14, alpha=0.05 / 0.8), optax.constant_schedule(0.05)],
      [14],
    )
  schedule = optimizers.create_learning_rate_schedule(
    0.8, 20, swa_start, 0.05, 0.1, warmup_steps=0, rewind_step=6
  )
  steps = np.arange(21)
  np.testing.assert_array_equal(_values(schedule, steps), _values(expected, steps))


def test_warmup_ramps_linearly_at_the_start_and_again_at_every_rewind():
  base = optimizers.create_learning_rate_schedule(1.0, 20, 14, 0.05)
  warmed = optimizers.create_learning_rate_schedule(
    1.0, 20, 14, 0.05, warmup_steps=4, rewind_step=8
  )
  steps = np.arange(21)
  ramp = np.ones(21)
  ramp[0:4] = ramp[8:12] = [0.25, 0.5, 0.75, 1.0]  # dense phase from 0, rounds from T0 = 8
  np.testing.assert_allclose(_values(warmed, steps), ramp * _values(base, steps), rtol=1e-6)
  # A round's optimizer counts from 0 at T0: its first step is the ramp's first.
  round_schedule = optimizers.offset_schedule(warmed, 8)
  np.testing.assert_array_equal(_values(round_schedule, steps[:13]), _values(warmed, steps[8:]))
