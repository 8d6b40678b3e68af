import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from swamp_jax import batchnorm, data, imp, masking, optimizers, particles, results
from swamp_jax.analyses import ensembles

from . import equivalence


class TinyNet(nn.Module):
  """Conv + BatchNorm + Dense: enough to exercise batch_stats through the lift."""

  num_classes: int = 3
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


def TINY_NET_RTOL(steps):
  """Two programs' TinyNet weights after ``steps`` steps (tests/equivalence.py): batches of
  16 images of 6x6 (conv gradients and batch statistics sum 576 terms); conv, BatchNorm and
  dense in sequence, forward and backward."""
  return equivalence.training_rtol(steps, 16 * 6 * 6, depth=2 * 3)


def _setup(n_examples=96, batch_size=16):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(n_examples, 6, 6, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, size=(n_examples,)).astype(np.int32)
  train = particles.DeviceData(
    jnp.asarray(images), jnp.asarray(labels), jnp.asarray([127.0]), jnp.asarray([70.0])
  )
  model = TinyNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  prunable = masking.compute_prunable(params)
  mask = masking.compute_mask(params, masking.create_dense_mask(params), prunable, 0.5)
  spec = particles.StepSpec(
    batch_size=batch_size,
    num_examples=n_examples,
    augment="crop_flip",
    swa_start_step=3,
    swa_every_steps=2,
  )
  tx = optimizers.masked(optimizers.create_sgd(0.05))
  return model, params, batch_stats, mask, spec, tx, train


def test_particles_start_identical_at_ticket_times_mask_with_different_orders():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  keys = jnp.stack([imp.particle_key(0, 1, n) for n in range(4)])
  states = particles.create_particles(params, batch_stats, mask, keys, tx)
  expected = masking.apply_mask(params, mask)
  for stacked, ticket in zip(
    jax.tree_util.tree_leaves(states.params), jax.tree_util.tree_leaves(expected), strict=True
  ):
    for n in range(4):
      np.testing.assert_array_equal(stacked[n], ticket)
  for stacked, ticket in zip(
    jax.tree_util.tree_leaves(states.batch_stats),
    jax.tree_util.tree_leaves(batch_stats),
    strict=True,
  ):
    np.testing.assert_array_equal(stacked[1], ticket)
  orders = [np.asarray(data.compute_epoch_permutation(k, 0, spec.num_examples)) for k in keys]
  for a in range(4):
    for b in range(a + 1, 4):
      assert not np.array_equal(orders[a][: spec.batch_size], orders[b][: spec.batch_size])


def test_lifted_steps_equal_a_loop_over_particles():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  keys = jnp.stack([imp.particle_key(3, 0, n) for n in range(3)])
  states = particles.create_particles(params, batch_stats, mask, keys, tx)
  lifted, _ = jax.jit(
    functools.partial(particles.train_steps, model=model, tx=tx, spec=spec),
    static_argnames="num_steps",
  )(states, mask, train, jnp.int32(0), num_steps=6)
  step = jax.jit(functools.partial(particles.train_step, model=model, tx=tx, spec=spec))
  for n in range(3):
    state = jax.tree_util.tree_map(lambda x, n=n: x[n], states)
    perm = data.compute_epoch_permutation(keys[n], 0, spec.num_examples)
    for t in range(6):
      state, _ = step(state, jnp.int32(t), perm, mask, train)
    mine = jax.tree_util.tree_map(lambda x, n=n: x[n], lifted)
    np.testing.assert_array_equal(mine.key, state.key)
    np.testing.assert_array_equal(mine.swa.count, state.swa.count)
    for field in ("params", "batch_stats", "opt_state", "swa"):
      equivalence.assert_trees_close_normwise(
        getattr(mine, field), getattr(state, field), TINY_NET_RTOL(6)
      )


def test_pruned_weights_stay_zero_and_swa_collects_on_schedule():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(2)])
  states = particles.create_particles(params, batch_stats, mask, keys, tx)
  states, losses = jax.jit(
    functools.partial(particles.train_steps, model=model, tx=tx, spec=spec),
    static_argnames="num_steps",
  )(states, mask, train, jnp.int32(0), num_steps=6)
  assert losses.shape == (6, 2) and np.all(np.isfinite(losses))
  for p, m in zip(
    jax.tree_util.tree_leaves(states.params), jax.tree_util.tree_leaves(mask), strict=True
  ):
    assert np.all(np.asarray(p)[:, ~np.asarray(m)] == 0)
  # Of 6 steps, only step 5 completed is collected (start 3, every 2: after the start).
  np.testing.assert_array_equal(states.swa.count, [1, 1])


def test_train_program_does_not_retrace_on_a_second_call():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  prunable = masking.compute_prunable(params)
  settings = imp.RoundSettings(0.2, True, 16, 0, 50)
  programs = imp.create_round_programs(model, tx, spec, prunable, settings)
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(2)])
  states = programs.start(params, batch_stats, mask, keys)
  states, _ = programs.train(states, mask, train, jnp.int32(0), num_steps=3)
  states, _ = programs.train(states, mask, train, jnp.int32(3), num_steps=3)
  assert programs.train._cache_size() == 1
  eval_data = imp.EvalData(train.images, train.labels, train.images[:0], train.labels[:0])
  out = programs.finish(states, mask, train, eval_data)
  programs.finish(states, mask, train, eval_data)
  assert programs.finish._cache_size() == 1
  # The next mask is pruned from the average of the particles' solutions.
  avg = jax.tree_util.tree_map(lambda x: x.mean(0), particles.compute_solutions(states))
  expected = masking.compute_mask(avg, mask, prunable, 0.2)
  for a, b in zip(
    jax.tree_util.tree_leaves(out.next_mask), jax.tree_util.tree_leaves(expected), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  particle0 = jax.tree_util.tree_map(lambda x: x[0], particles.compute_solutions(states))
  from_particle = masking.compute_mask(particle0, mask, prunable, 0.2)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree_util.tree_leaves(out.next_mask),
      jax.tree_util.tree_leaves(from_particle),
      strict=True,
    )
  )


def test_recomputed_batch_stats_are_the_mean_of_per_batch_statistics():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  new = batchnorm.recompute_batch_stats(
    model, params, batch_stats, train.images, train.mean, train.std, batch_size=16, num_batches=3
  )
  order = np.asarray(jax.random.permutation(jax.random.key(0), 96))[:48].reshape(3, 16)
  means, variances = [], []
  for idx in order:
    x = data.preprocess(train.images[idx], train.mean, train.std)
    conv = nn.Conv(4, (3, 3)).apply({"params": params["Conv_0"]}, x)
    means.append(np.mean(conv, axis=(0, 1, 2)))
    variances.append(np.var(conv, axis=(0, 1, 2)))
  np.testing.assert_allclose(new["BatchNorm_0"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["BatchNorm_0"]["var"], np.mean(variances, 0), rtol=1e-4, atol=1e-5)


def test_chunks_end_every_call_from_the_phase_start_and_at_checkpoints():
  assert list(imp.compute_chunks(0, 5, 25, 10)) == [(5, 5), (10, 10), (20, 5)]
  assert list(imp.compute_chunks(0, 0, 0, 10)) == []
  # A round from step 11 in calls of 20 steps, checkpoints every 15 steps.
  assert list(imp.compute_chunks(11, 11, 61, 20, 15)) == [
    (11, 4),
    (15, 15),
    (30, 1),
    (31, 14),
    (45, 6),
    (51, 9),
    (60, 1),
  ]
  # Resuming at a boundary continues with the same pieces.
  assert list(imp.compute_chunks(11, 45, 61, 20, 15)) == [(45, 6), (51, 9), (60, 1)]


def test_steps_across_epoch_boundaries_equal_one_call_per_epoch():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(2)])
  train_fn = jax.jit(
    functools.partial(particles.train_steps, model=model, tx=tx, spec=spec),
    static_argnames="num_steps",
  )
  spe = spec.steps_per_epoch
  whole = particles.create_particles(params, batch_stats, mask, keys, tx)
  whole, whole_losses = train_fn(whole, mask, train, jnp.int32(3), num_steps=2 * spe)
  pieces = particles.create_particles(params, batch_stats, mask, keys, tx)
  losses = []
  for start, n in imp.compute_chunks(0, 3, 3 + 2 * spe, spe):
    pieces, piece_losses = train_fn(pieces, mask, train, jnp.int32(start), num_steps=n)
    losses.append(piece_losses)
  # One scan or several: XLA may fuse and order each step's sums differently.
  rtol = TINY_NET_RTOL(2 * spe)
  equivalence.assert_close_normwise(whole_losses, np.concatenate(losses), rtol)
  equivalence.assert_trees_close_normwise(whole.params, pieces.params, rtol)


def test_masked_grads_with_custom_inner_transform_in_a_step():
  model, params, batch_stats, mask, spec, tx, train = _setup()
  tx = optimizers.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)))
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(2)])
  states = particles.create_particles(params, batch_stats, mask, keys, tx)
  states, _ = jax.jit(
    functools.partial(particles.train_steps, model=model, tx=tx, spec=spec),
    static_argnames="num_steps",
  )(states, mask, train, jnp.int32(0), num_steps=4)
  kernel = np.asarray(states.params["Dense_0"]["kernel"])
  assert np.all(kernel[:, ~np.asarray(mask["Dense_0"]["kernel"])] == 0)


def _finish(num_particles, swa_snapshots, unaveraged=False):
  """A trained round of TinyNet (BatchNorm) finished under the given averaging."""
  model, params, batch_stats, mask, spec, tx, train = _setup()
  prunable = masking.compute_prunable(params)
  settings = imp.RoundSettings(0.2, True, 16, 0, 50, swa_snapshots, unaveraged)
  spec = dataclasses.replace(spec, swa_start_step=4 if swa_snapshots else 100)
  programs = imp.create_round_programs(model, tx, spec, prunable, settings)
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(num_particles)])
  states = programs.start(params, batch_stats, mask, keys)
  states, _ = programs.train(states, mask, train, jnp.int32(0), num_steps=8)
  eval_data = imp.EvalData(train.images, train.labels, train.images[:0], train.labels[:0])
  out = programs.finish(states, mask, train, eval_data)
  recomputed = batchnorm.recompute_batch_stats(
    model, out.params, batch_stats, train.images, train.mean, train.std, 16, 0
  )
  return model, train, states, out, recomputed


def _same_tree(a, b):
  return all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  )


def test_imp_keeps_running_batchnorm_statistics_and_reports_the_recomputed_ones_beside():
  model, train, states, out, recomputed = _finish(num_particles=1, swa_snapshots=0)
  own = jax.tree_util.tree_map(lambda x: x[0], states.batch_stats)
  assert _same_tree(out.batch_stats, own)  # plain IMP: nothing averaged, nothing recomputed
  assert _same_tree(out.particle_batch_stats, states.batch_stats)
  m = jax.device_get(out.metrics)
  assert not m["bn/average_recomputed"]
  assert m["average/test_accuracy"] == m["average_running_bn/test_accuracy"]
  assert "average_recomputed_bn/test_accuracy" in m
  result = results.RoundResult.from_metrics(1, 5, 10, 1, m, 0.0)
  assert result.bn_statistics == "running"
  assert result.test_accuracy == result.running_bn_test_accuracy
  # What a 2-IMP ensemble reads back (the saved round model) has the statistics of the IMP row.
  members = ensembles.stack_members([out.params] * 2)
  member_bs = ensembles.stack_members([out.batch_stats] * 2)
  ensemble = ensembles.evaluate_ensemble(
    model, members, member_bs, train.images, train.labels, train.mean, train.std, 50
  )
  np.testing.assert_allclose(ensemble["member_accuracies"], [m["average/test_accuracy"]] * 2)


def test_averaged_solutions_get_recomputed_batchnorm_statistics():
  for num_particles, snapshots in ((2, 0), (1, 3), (2, 3)):
    _, _, states, out, recomputed = _finish(num_particles, snapshots)
    assert _same_tree(out.batch_stats, recomputed), (num_particles, snapshots)
    m = jax.device_get(out.metrics)
    assert m["bn/average_recomputed"]
    assert m["average/test_accuracy"] == m["average_recomputed_bn/test_accuracy"]
    result = results.RoundResult.from_metrics(1, 5, 10, num_particles, m, 0.0)
    assert result.bn_statistics == "recomputed"
    assert result.running_bn_test_accuracy is not None
    # A particle's statistics are recomputed only when its solution is a SWA mean.
    assert _same_tree(out.particle_batch_stats, states.batch_stats) == (snapshots == 0)
  # The earlier behaviour, on request: IMP's last weights get recomputed statistics too.
  _, _, _, out, recomputed = _finish(1, 0, unaveraged=True)
  assert _same_tree(out.batch_stats, recomputed)
