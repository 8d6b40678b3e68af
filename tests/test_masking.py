import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax import masking


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "Conv_0": {
      "kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    },
    "BatchNorm_0": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))},
    "Dense_0": {
      "kernel": jnp.asarray(rng.normal(size=(72, 50)), jnp.float32),
      "bias": jnp.zeros((50,)),
    },
    "head": {
      "kernel": jnp.asarray(rng.normal(size=(50, 10)), jnp.float32),
      "bias": jnp.zeros((10,)),
    },
  }


def test_only_kernels_are_prunable_and_exclude_regexes_remove_more():
  p = _params()
  prunable = masking.compute_prunable(p)
  assert (
    prunable["Conv_0"]["kernel"] and prunable["Dense_0"]["kernel"] and prunable["head"]["kernel"]
  )
  assert not prunable["Conv_0"]["bias"]
  assert not prunable["BatchNorm_0"]["scale"] and not prunable["BatchNorm_0"]["bias"]
  prunable = masking.compute_prunable(p, exclude=[r"^Conv_0/", r"head"])
  assert not prunable["Conv_0"]["kernel"] and not prunable["head"]["kernel"]
  assert prunable["Dense_0"]["kernel"]


def test_bad_exclude_regex_and_excluding_everything_raise():
  with pytest.raises(ValueError, match=r"not a valid regex"):
    masking.compute_prunable(_params(), exclude=["(unclosed"])
  with pytest.raises(ValueError, match="no prunable weights"):
    masking.compute_prunable(_params(), exclude=["kernel"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_prune_fraction_outside_open_interval_raises(fraction):
  p = _params()
  with pytest.raises(ValueError, match="prune_fraction"):
    masking.compute_mask(p, masking.create_dense_mask(p), masking.compute_prunable(p), fraction)


def test_sparsity_after_k_prunes_is_exact_and_masks_only_shrink():
  p = _params()
  prunable = masking.compute_prunable(p)
  mask = masking.create_dense_mask(p)
  _, total = masking.count_prunable(mask, prunable)
  prune = jax.jit(lambda params, m: masking.compute_mask(params, m, prunable, 0.2))
  for k in range(1, 13):
    # New random magnitudes each round: the mask must still only shrink.
    new = prune(_params(seed=k), mask)
    for old_leaf, new_leaf in zip(
      jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(new), strict=True
    ):
      assert not np.any(np.asarray(new_leaf) & ~np.asarray(old_leaf))
    mask = new
    kept, _ = masking.count_prunable(mask, prunable)
    assert int(kept) == masking.expected_surviving(total, 0.2, k)
    assert abs(masking.compute_sparsity(mask, prunable) - (1 - 0.8**k)) < 1.0 / total + 1e-9
  # Non-prunable leaves are never pruned.
  assert np.all(mask["Conv_0"]["bias"]) and np.all(mask["BatchNorm_0"]["scale"])


def test_pruning_is_global_smallest_magnitudes_across_layers():
  p = _params()
  p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"] * 1e-3  # the smallest weights all live here
  prunable = masking.compute_prunable(p)
  mask = masking.compute_mask(p, masking.create_dense_mask(p), prunable, 0.2)
  removed = {k: int(np.sum(~np.asarray(mask[k]["kernel"]))) for k in ("Conv_0", "Dense_0", "head")}
  assert removed["Conv_0"] == 0 and removed["head"] == 0
  assert removed["Dense_0"] == round(0.2 * (72 + 3600 + 500))
  # And the survivors are exactly those above the global threshold.
  all_w = np.concatenate([np.abs(np.asarray(p[k]["kernel"])).ravel() for k in removed])
  threshold = np.sort(all_w)[removed["Dense_0"] - 1]
  assert np.all(
    np.abs(np.asarray(p["Dense_0"]["kernel"]))[np.asarray(mask["Dense_0"]["kernel"])] > threshold
  )


def test_pruned_weights_never_come_back_even_if_large():
  p = _params()
  prunable = masking.compute_prunable(p)
  mask = masking.compute_mask(p, masking.create_dense_mask(p), prunable, 0.5)
  big = jax.tree_util.tree_map(lambda x: x * 0 + 100.0, p)  # pruned spots now the largest
  new = masking.compute_mask(big, mask, prunable, 0.2)
  for m_old, m_new in zip(
    jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(new), strict=True
  ):
    assert not np.any(np.asarray(m_new) & ~np.asarray(m_old))


def test_ties_are_broken_deterministically_by_position():
  p = jax.tree_util.tree_map(jnp.ones_like, _params())
  prunable = masking.compute_prunable(p)
  dense = masking.create_dense_mask(p)
  first = masking.compute_mask(p, dense, prunable, 0.2)
  second = jax.jit(lambda q: masking.compute_mask(q, dense, prunable, 0.2))(p)
  for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)
  # Leaf order is the flattened (sorted-key) order: Conv_0, Dense_0, head.
  flat = np.concatenate(
    [np.asarray(first[k]["kernel"]).ravel() for k in ("Conv_0", "Dense_0", "head")]
  )
  n_remove = round(0.2 * flat.size)
  assert not flat[:n_remove].any() and flat[n_remove:].all()


def test_apply_mask_zeroes_pruned_entries_and_broadcasts_over_particles():
  p = _params()
  prunable = masking.compute_prunable(p)
  mask = masking.compute_mask(p, masking.create_dense_mask(p), prunable, 0.5)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x, 3 * x]), p)
  out = masking.apply_mask(stacked, mask)
  for leaf, m in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(mask), strict=True):
    assert leaf.shape[0] == 3
    assert np.all(np.asarray(leaf)[:, ~np.asarray(m)] == 0)
  assert out["Dense_0"]["kernel"].dtype == jnp.float32
