"""Digests of a state's arrays, to tell a checkpoint restored intact from a damaged one.

A flipped bit inside a checkpoint's data file can decode to a finite, wrong
weight that no format check notices. ``compute_digests`` sums a mixing hash
of every element's bits and its position, in uint32 arithmetic under ``jit``
(small leaves by numpy on the host, the same arithmetic): the sums are exact
whatever the order, so the digest of a global array is the same on any mesh
and any number of processes, and each process only reads the shards it holds
(nothing large is gathered to a host). Any change of one
element changes the digest (the hash is a bijection of the bits for a fixed
position); it is a guard against damage, not against an adversary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _mix(x: jax.Array) -> jax.Array:
  """A bijective avalanche of uint32 values (murmur3's finalizer)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 [..., k] (k words per element; k = 1 up to 4 bytes)."""
  itemsize = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)[..., None]
  if itemsize == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)[..., None]
  if itemsize < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)[..., None]
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


def _leaf_digest(x: jax.Array) -> jax.Array:
  words = _as_words(jnp.asarray(x))
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
      stride % 2**32
    )
    stride *= words.shape[axis]
  a = _mix(words ^ _mix(position))
  b = _mix(words + _mix(position ^ _GOLDEN))
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.array(True)


# One small program per leaf shape, dtype and sharding, not one for the whole tree: a state's
# many leaves share a few shapes (params, momenta, SWA means and mask alike), and one jit over
# all of them compiled for about 3 s at every new particle count, ten times these.
@jax.jit
def _leaf_digest_and_finite(x):
  return _leaf_digest(x), _leaf_finite(x)


# Leaves of up to this many elements that this process holds whole are hashed on the host by
# numpy, in the same uint32 arithmetic (the same digest): a network's many small leaves
# (biases, norms, small kernels, keys) would each compile a program for their shape (28
# programs, 2.3 s of a 21 s small run), while copying them to the host costs microseconds.
# Larger leaves are hashed where they live (no host copy of big weights).
HOST_MAX_ELEMENTS = 1 << 16


def _host_words(x: np.ndarray) -> np.ndarray:
  """``_as_words`` in numpy (little-endian words, as XLA's bitcast)."""
  flat = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    words = flat.astype(np.uint32)
  elif x.dtype.itemsize < 4:
    words = flat.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint32)
  else:
    words = flat.view(np.uint32)
  return words.reshape(*x.shape, max(x.dtype.itemsize // 4, 1))


def _host_digest_and_finite(x: np.ndarray) -> tuple[np.ndarray, bool]:
  """``_leaf_digest_and_finite`` of a host array, computed by numpy (wrapping uint32)."""
  words = _host_words(x)
  position = np.arange(words.size, dtype=np.uint32).reshape(words.shape)
  a = _mix(words ^ _mix(position))
  b = _mix(words + _mix(position ^ _GOLDEN))
  digest = np.stack([np.sum(a, dtype=np.uint32), np.sum(b, dtype=np.uint32)])
  finite = bool(np.all(np.isfinite(x))) if np.issubdtype(x.dtype, np.inexact) else True
  return digest, finite


def _on_host(x, host_max_elements: int) -> bool:
  whole = not isinstance(x, jax.Array) or x.is_fully_addressable
  return whole and np.size(x) <= host_max_elements


def _to_host(x) -> np.ndarray:
  """A replicated result on the host, reading only a shard this process holds."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def compute_digests(
  tree, host_max_elements: int = HOST_MAX_ELEMENTS
) -> tuple[dict[str, str], list[str]]:
  """Digests of every leaf of ``tree``, and the paths of leaves holding NaN or inf.

  Args:
    tree: a pytree of arrays (``jax.Array`` of any sharding, possibly spanning
      several processes, or numpy).
    host_max_elements: leaves this process holds whole and of at most this
      many elements are hashed by numpy on the host, the others under jit
      (the same digest either way).

  Returns:
    ``({keystr(path): 16 hex digits}, [keystr(path) of non-finite leaves])``.
    The digest depends only on each array's shape, dtype and values.
  """
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  digests, non_finite = {}, []
  for path, x in zip(paths, jax.tree_util.tree_leaves(tree), strict=True):
    # Each leaf's result is read before the next program starts: on a mesh these programs
    # reduce across devices, and several in flight at once deadlocked XLA:CPU's collectives
    # (8 fake devices on 2 cores, a rendezvous that never completed).
    if _on_host(x, host_max_elements):
      # The dtype the device path would see (float64 is float32 without jax_enable_x64).
      x = np.asarray(x)
      digest, finite = _host_digest_and_finite(x.astype(jax.dtypes.canonicalize_dtype(x.dtype)))
    else:
      digest, finite = _leaf_digest_and_finite(x)
    a, b = (int(v) for v in _to_host(digest))
    digests[path] = f"{a:08x}{b:08x}"
    if not bool(_to_host(finite)):
      non_finite.append(path)
  return digests, non_finite


def compare_digests(saved: dict[str, str], current: dict[str, str]) -> list[str]:
  """Paths whose digest differs from (or is missing in) ``saved``."""
  return sorted(p for p in set(saved) | set(current) if saved.get(p) != current.get(p))
