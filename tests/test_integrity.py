"""Digests of arrays: any changed element is caught, on any mesh and dtype."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import imp, integrity

from .conftest import run_python_on_fake_devices


def _tree():
  return {
    "w": jnp.arange(24.0).reshape(4, 6),
    "mask": jnp.arange(6) % 2 == 0,
    "key": jax.random.PRNGKey(3),
    "ticket": imp.Ticket(jnp.ones((2, 3), jnp.bfloat16), {}),
  }


def test_one_flipped_bit_in_any_leaf_changes_only_that_digest():
  tree = _tree()
  digests, non_finite = integrity.compute_digests(tree)
  assert non_finite == [] and len(digests) == 4
  host = jax.tree_util.tree_map(np.asarray, tree)
  for path, leaf in jax.tree_util.tree_leaves_with_path(host):
    for position in (0, leaf.size - 1):
      raw = leaf.copy().view(np.uint8).reshape(-1)
      raw[position * leaf.itemsize] ^= 1
      flipped = raw.view(leaf.dtype).reshape(leaf.shape)
      damaged = jax.tree_util.tree_map_with_path(
        lambda p, x, target=path, new=flipped: new if p == target else x, host
      )
      changed = integrity.compare_digests(digests, integrity.compute_digests(damaged)[0])
      assert changed == [jax.tree_util.keystr(path)]


def test_swapping_two_elements_changes_the_digest_and_nan_is_reported():
  x = jnp.arange(5.0)
  swapped = x.at[jnp.array([1, 2])].set(jnp.array([2.0, 1.0]))
  assert integrity.compute_digests(x)[0] != integrity.compute_digests(swapped)[0]
  assert integrity.compute_digests({"a": x.at[3].set(jnp.inf)})[1] == ["['a']"]


_SHARDED = """
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from swamp_jax import integrity
from tests.test_integrity import _tree
mesh = Mesh(jax.devices()[:4], ("particle",))
tree = _tree()
tree["w"] = jax.device_put(tree["w"], NamedSharding(mesh, P("particle")))
tree["mask"] = jax.device_put(tree["mask"], NamedSharding(mesh, P()))
assert len(tree["w"].addressable_shards) == 4
# Under jit on the shards, and by numpy from the shards of replica 0 (the mask's 4 replicas
# count once) at their places in the whole array.
on_device = integrity.compute_digests(tree, host_max_elements=0)
print(json.dumps([on_device, integrity.compute_digests(tree)]))
"""


def test_digest_of_a_sharded_array_equals_the_unsharded_one():
  proc = run_python_on_fake_devices(_SHARDED, 4)
  assert proc.returncode == 0, proc.stderr[-2000:]
  on_device, on_host = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = [integrity.compute_digests(_tree())[0], []]
  assert on_device == expected and on_host == expected


def test_host_and_device_digests_are_the_same_for_every_dtype_and_shape():
  rng = np.random.default_rng(0)
  leaves = {
    "f32": rng.normal(size=(3, 5)).astype(np.float32),
    "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
    "bool": rng.random((2, 3, 4)) < 0.5,
    "u32": np.asarray(jax.random.PRNGKey(5)),
    "i8": rng.integers(-128, 127, (9,)).astype(np.int8),
    "scalar": np.float32(-2.5),
    "f64": rng.normal(size=(4,)),  # float32 to jax without x64, on either path
    "nan": np.asarray([1.0, np.nan], np.float32),
  }
  host = integrity.compute_digests(leaves)
  device = integrity.compute_digests(jax.tree_util.tree_map(jnp.asarray, leaves), 0)
  assert host == device and host[1] == ["['nan']"]
