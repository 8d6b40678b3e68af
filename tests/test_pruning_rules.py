"""Pruning rules: scopes, criteria, a user's score function, prunable leaves, exact counts."""

import fractions
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swamp_jax
from swamp_jax import config as config_lib
from swamp_jax import imp, masking, runner

from .conftest import create_tiny_config


def _params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
    "Conv_0": {"kernel": normal(3, 3, 1, 8), "bias": normal(8)},
    "Dense_0": {"kernel": normal(72, 50), "bias": jnp.zeros((50,))},
    "head": {"kernel": normal(50, 10), "bias": jnp.zeros((10,))},
  }


def _exact_round(p, n: int) -> int:
  """floor(p * n + 1/2) in exact rationals: the documented rounding."""
  return math.floor(fractions.Fraction(str(p)) * n + fractions.Fraction(1, 2))


def _removed(old, new) -> int:
  old, new = np.asarray(old), np.asarray(new)
  assert not np.any(new & ~old), "a pruned weight came back"
  return int(np.sum(old & ~new))


def _jit_mask(prunable, fraction, rule=None):
  """``compute_mask`` compiled once for one static setting (jit beats op-by-op here)."""
  return jax.jit(
    lambda w, m, key=None: masking.compute_mask(w, m, prunable, fraction, rule, key=key)
  )


def _assert_only_shrinks(old, new):
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new), strict=True):
    _removed(a, b)


# --- Exact counts. ---


def test_num_remove_is_exact_where_float32_drifts():
  n = 10_485_767
  assert masking.compute_num_remove(0.2, n) == 2_097_153 == round(0.2 * n)
  traced = jax.jit(lambda k: masking.compute_num_remove(0.2, k))(jnp.int32(n))
  assert traced.dtype == jnp.int32 and int(traced) == 2_097_153
  # The float32 arithmetic this replaces removes one too many here.
  assert int(jnp.round(jnp.float32(0.2) * jnp.float32(n))) == 2_097_154


@pytest.mark.parametrize("p", [0.2, 0.5, 0.36, 0.125, 0.9999, 0.0001, "46339/46340"])
def test_num_remove_is_exact_up_to_int32_max(p):
  p = fractions.Fraction(p) if isinstance(p, str) else p
  rng = np.random.default_rng(0)
  ns = [0, 1, 2, 3, 5, 9, 10_485_767, 2**31 - 1, 2**31 - 2, 2**31 - 46340, 2**30 + 7]
  ns += [int(n) for n in rng.integers(0, 2**31 - 1, size=50)]
  counts = jax.jit(jax.vmap(lambda k: masking.compute_num_remove(p, k)))(jnp.asarray(ns, jnp.int32))
  assert [int(c) for c in counts] == [_exact_round(p, n) for n in ns]
  assert [masking.compute_num_remove(p, n) for n in ns] == [_exact_round(p, n) for n in ns]


def test_halves_round_up():
  assert [masking.compute_num_remove(0.5, n) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]


@pytest.mark.parametrize("rows, p", [(1021, 0.2), (61, 0.36), (61, 0.9999)])
def test_realized_mask_removes_exactly_the_count(rows, p):
  # Two leaves, global scope (1,048,583 weights at most): the same int32 path as any size.
  rng = np.random.default_rng(0)
  params = {
    "a": {"kernel": jnp.asarray(rng.normal(size=(rows, 1024)), jnp.float32)},
    "b": {"kernel": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)},
  }
  prunable = masking.compute_prunable(params)
  dense = masking.create_dense_mask(params)
  mask = jax.jit(lambda w, m: masking.compute_mask(w, m, prunable, p))(params, dense)
  removed = sum(_removed(dense[k]["kernel"], mask[k]["kernel"]) for k in "ab")
  assert removed == _exact_round(p, rows * 1024 + 21)


@pytest.mark.parametrize("p", [0.1234567, 1e-5, 1 / 3])
def test_fraction_with_a_large_denominator_is_refused_naming_the_field(p):
  with pytest.raises(ValueError, match="prune_fraction .* denominator"):
    masking.as_fraction(p)
  with pytest.raises(ValueError, match="prune_fraction"):
    config_lib.validate_config(create_tiny_config(prune_fraction=p))


# --- Scope. ---


def test_layerwise_scope_removes_round_p_n_from_every_layer():
  p = _params()
  prunable = masking.compute_prunable(p)
  rule = masking.PruningRule(scope="layerwise")
  dense = masking.create_dense_mask(p)
  prune = _jit_mask(prunable, 0.2, rule)
  mask = dense
  for fraction, step in ((0.5, _jit_mask(prunable, 0.5, rule)), (0.2, prune), (0.2, prune)):
    new = step(p, mask)
    _assert_only_shrinks(mask, new)
    for layer in ("Conv_0", "Dense_0", "head"):
      old_k, new_k = np.asarray(mask[layer]["kernel"]), np.asarray(new[layer]["kernel"])
      assert _removed(old_k, new_k) == _exact_round(fraction, int(old_k.sum()))
      # Within the layer, the removed weights are its smallest survivors.
      w = np.abs(np.asarray(p[layer]["kernel"]))
      assert w[old_k & ~new_k].max() <= w[new_k].min()
    mask = new
  # The global scope takes all of one round from the layer with the smallest weights.
  small = dict(p, Dense_0={**p["Dense_0"], "kernel": p["Dense_0"]["kernel"] * 1e-3})
  glob = _jit_mask(prunable, 0.2)(small, dense)
  layer = prune(small, dense)
  assert _removed(dense["head"]["kernel"], glob["head"]["kernel"]) == 0
  assert _removed(dense["head"]["kernel"], layer["head"]["kernel"]) == 100


# --- Criterion. ---


def test_random_criterion_is_reproducible_from_the_seed_and_exact():
  p = _params()
  prunable = masking.compute_prunable(p)
  dense = masking.create_dense_mask(p)
  rule = masking.PruningRule(criterion="random")
  prune = _jit_mask(prunable, 0.2, rule)

  def flat(mask):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(mask)])

  a = flat(prune(p, dense, imp.prune_key(0, 1)))
  np.testing.assert_array_equal(a, flat(prune(p, dense, imp.prune_key(0, 1))))
  assert np.any(a != flat(prune(p, dense, imp.prune_key(1, 1))))  # another seed
  assert np.any(a != flat(prune(p, dense, imp.prune_key(0, 2))))  # another round
  # Scores do not depend on the weights: other weights, same mask.
  np.testing.assert_array_equal(a, flat(prune(_params(seed=5), dense, imp.prune_key(0, 1))))
  total = 72 + 3600 + 500
  first = prune(p, dense, imp.prune_key(0, 1))
  assert int(masking.count_prunable(first, prunable)[0]) == total - _exact_round(0.2, total)
  # Random pruning, layerwise too, from a mask that already has holes: exact per layer.
  rule = masking.PruningRule(scope="layerwise", criterion="random")
  new = _jit_mask(prunable, 0.2, rule)(p, first, imp.prune_key(0, 3))
  _assert_only_shrinks(first, new)
  for layer in ("Conv_0", "Dense_0", "head"):
    old_k = np.asarray(first[layer]["kernel"])
    assert _removed(old_k, new[layer]["kernel"]) == _exact_round(0.2, int(old_k.sum()))
  with pytest.raises(ValueError, match="needs a key"):
    masking.compute_mask(p, dense, prunable, 0.2, masking.PruningRule(criterion="random"))


def _negated_magnitude(params, prunable):
  return jax.tree_util.tree_map(lambda w, q: -jnp.abs(w) if q else None, params, prunable)


def test_score_function_is_used_and_pruned_weights_stay_pruned():
  p = _params()
  prunable = masking.compute_prunable(p)
  rule = masking.PruningRule(score_fn=_negated_magnitude)
  mask = _jit_mask(prunable, 0.2, rule)(p, masking.create_dense_mask(p))
  w = np.concatenate([np.abs(np.asarray(p[k]["kernel"])).ravel() for k in ("Conv_0", "Dense_0")])
  w = np.concatenate([w, np.abs(np.asarray(p["head"]["kernel"])).ravel()])
  m = np.concatenate([np.asarray(mask[k]["kernel"]).ravel() for k in ("Conv_0", "Dense_0", "head")])
  assert int((~m).sum()) == _exact_round(0.2, w.size)
  assert w[~m].min() >= w[m].max()  # the largest went
  # Scores that favour the pruned weights most cannot bring them back.
  favour_pruned = lambda params, prunable: jax.tree_util.tree_map(
    lambda k: jnp.where(k, 0.0, 1e9), mask
  )
  new = _jit_mask(prunable, 0.2, masking.PruningRule(score_fn=favour_pruned))(p, mask)
  _assert_only_shrinks(mask, new)
  assert int(masking.count_prunable(new, prunable)[0]) == int(m.sum()) - _exact_round(
    0.2, int(m.sum())
  )


@pytest.mark.parametrize(
  "score, match",
  [
    (lambda p, q: {"Conv_0": p["Conv_0"], "head": p["head"]}, "'Dense_0"),
    (lambda p, q: {**p, "extra": jnp.zeros(3)}, "'extra'"),
    (lambda p, q: {**p, "head": {**p["head"], "kernel": p["head"]["kernel"].T}}, "head/kernel"),
    (
      lambda p, q: {**p, "Dense_0": {**p["Dense_0"], "kernel": jnp.ones((72, 50), jnp.int32)}},
      "Dense_0/kernel.*float",
    ),
    (lambda p, q: {**p, "Conv_0": {**p["Conv_0"], "kernel": None}}, "Conv_0/kernel.*not an array"),
    (
      lambda p, q: {**p, "head": {**p["head"], "kernel": jnp.log(0 * p["head"]["kernel"])}},
      "finite",
    ),
  ],
)
def test_score_function_that_does_not_fit_is_named(score, match):
  p = _params()
  with pytest.raises(ValueError, match=match):
    masking.check_score_fn(score, p, masking.compute_prunable(p))


def test_bad_rule_settings_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="prune scope"):
    masking.PruningRule(scope="per_layer")
  with pytest.raises(ValueError, match="prune criterion"):
    masking.PruningRule(criterion="gradient")
  for field, value in [
    ("prune_scope", "per_layer"),
    ("prune_criterion", "gradient"),
    ("prune_leaves", ()),
    ("prune_leaves", ("kernel", "")),
  ]:
    with pytest.raises(ValueError, match=field):
      config_lib.validate_config(create_tiny_config(**{field: value}))


# --- Which leaves are prunable. ---


def _mixed_params():
  """Attention (3-D DenseGeneral kernels), Embed, and 1-D and 3-D convs.

  The real modules' paths and shapes (``eval_shape``: no slow eager init),
  filled with random numbers.
  """
  key = jax.random.PRNGKey(0)
  x = jnp.ones((1, 4, 16))
  modules = {
    "attention": (nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16), (x, x)),
    "embed": (nn.Embed(50, 16), (jnp.zeros((1, 4), jnp.int32),)),
    "conv1d": (nn.Conv(8, (3,)), (jnp.ones((1, 10, 4)),)),
    "conv3d": (nn.Conv(8, (3, 3, 3)), (jnp.ones((1, 5, 5, 5, 2)),)),
  }
  shapes = {k: jax.eval_shape(m.init, key, *args)["params"] for k, (m, args) in modules.items()}
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_attention_embed_and_any_rank_conv_kernels_are_prunable_when_configured():
  p = _mixed_params()
  assert p["attention"]["query"]["kernel"].shape == (16, 2, 8)  # DenseGeneral, 3-D
  assert p["attention"]["out"]["kernel"].shape == (2, 8, 16)
  assert p["conv1d"]["kernel"].ndim == 3 and p["conv3d"]["kernel"].ndim == 5
  default = masking.compute_prunable(p)
  assert all(default["attention"][k]["kernel"] for k in ("query", "key", "value", "out"))
  assert not default["attention"]["query"]["bias"]
  assert default["conv1d"]["kernel"] and default["conv3d"]["kernel"]
  assert not default["embed"]["embedding"]  # Embed tables only when asked
  prunable = masking.compute_prunable(p, leaves=("kernel", "embedding"))
  assert prunable["embed"]["embedding"] and not prunable["conv3d"]["bias"]
  rule = masking.PruningRule(scope="layerwise")
  dense = masking.create_dense_mask(p)
  mask = _jit_mask(prunable, 0.2, rule)(p, dense)
  flags = jax.tree_util.tree_leaves(prunable)
  for m, w, q in zip(
    jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(p), flags, strict=True
  ):
    assert m.shape == w.shape
    assert int((~np.asarray(m)).sum()) == (_exact_round(0.2, w.size) if q else 0)
  pruned = masking.apply_mask(p, mask)
  assert np.all(
    np.asarray(pruned["embed"]["embedding"])[~np.asarray(mask["embed"]["embedding"])] == 0
  )
  glob = _jit_mask(prunable, 0.2)(p, dense)
  leaves = zip(jax.tree_util.tree_leaves(p), flags, strict=True)
  total = sum(w.size for w, q in leaves if q)
  assert total - int(masking.count_prunable(glob, prunable)[0]) == _exact_round(0.2, total)


# --- Through run(). ---


def test_run_with_negated_magnitude_score_prunes_the_largest_weights(tmp_path):
  config = create_tiny_config(num_rounds=1, epochs_per_round=1, rewind_epochs=0, num_particles=1)
  config.prune_scope = "layerwise"
  out = swamp_jax.run(config, str(tmp_path), prune_score=_negated_magnitude)
  params0 = swamp_jax.load_round_model(str(tmp_path), 0)["params"]
  mask1 = swamp_jax.load_round_model(str(tmp_path), 1)["mask"]
  prunable = masking.compute_prunable(params0)
  for w, m, q in zip(
    *(jax.tree_util.tree_leaves(t) for t in (params0, mask1, prunable)), strict=True
  ):
    w, m = np.abs(np.asarray(w)), np.asarray(m)
    if not q:
      assert m.all()
      continue
    assert int((~m).sum()) == _exact_round(0.2, m.size)
    assert w[~m].min() >= w[m].max()  # each layer lost its largest weights
  leaves = zip(jax.tree_util.tree_leaves(mask1), jax.tree_util.tree_leaves(prunable), strict=True)
  expected = sum(m.size - _exact_round(0.2, m.size) for m, q in leaves if q)
  assert out.rounds[1].remaining == expected


def test_run_refuses_a_bad_score_function_before_training_and_writes_nothing(tmp_path, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("training started")

  monkeypatch.setattr(runner, "train_phase", no_training)
  bad = lambda params, prunable: {"fc1": params["fc1"]}
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="prune_score.*structure"):
    swamp_jax.run(create_tiny_config(), str(workdir), prune_score=bad)
  assert not workdir.exists()
  # Not even with overwrite: an earlier run's files are left alone.
  workdir.mkdir()
  (workdir / "results.jsonl").write_text("earlier\n")
  with pytest.raises(ValueError, match="prune_score"):
    swamp_jax.run(create_tiny_config(overwrite=True), str(workdir), prune_score=bad)
  # The workdir's lock file aside (taken before anything is loaded).
  assert sorted(set(os.listdir(workdir)) - {".lock"}) == ["results.jsonl"]
  assert (workdir / "results.jsonl").read_text() == "earlier\n"


def test_run_with_random_criterion_prunes_with_the_seeds_prune_key():
  config = create_tiny_config(num_rounds=1, epochs_per_round=1, rewind_epochs=0, num_particles=1)
  config.prune_criterion = "random"
  out = swamp_jax.run(config)
  # Random scores ignore the weights: round 0's mask (dense) and key give round 1's mask.
  prunable = masking.compute_prunable(out.params)
  rule = masking.PruningRule(criterion="random")
  dense = masking.create_dense_mask(out.params)
  expected = masking.compute_mask(
    out.params, dense, prunable, 0.2, rule, key=imp.prune_key(config.seed, 0)
  )
  for a, b in zip(
    jax.tree_util.tree_leaves(out.mask), jax.tree_util.tree_leaves(expected), strict=True
  ):
    np.testing.assert_array_equal(a, b)
