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


# Leaves of up to this many elements are hashed on the host by numpy, in the same uint32
# arithmetic (the same digest), each process its own shards: a network's many small leaves
# (biases, norms, small kernels, keys) would each compile a program for their shape (28
# programs, 2.3 s of a 21 s small run; in a multi-process run every process compiles them,
# as process 1 never reads the persistent compilation cache), while copying them to the
# host costs microseconds. Larger leaves are hashed where they live (no host copy of big
# weights).
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


def _host_sums(x: np.ndarray, position: np.ndarray) -> np.ndarray:
  """uint32 [a, b, non-finite count] of the words of ``x`` at ``position`` (the sums of
  ``_leaf_digest``, wrapping): parts of one array add up to the whole array's."""
  words = _host_words(x)
  a = _mix(words ^ _mix(position))
  b = _mix(words + _mix(position ^ _GOLDEN))
  bad = np.count_nonzero(~np.isfinite(x)) if np.issubdtype(x.dtype, np.inexact) else 0
  return np.stack([np.sum(a, dtype=np.uint32), np.sum(b, dtype=np.uint32), np.uint32(bad)])


def _word_positions(shape: tuple, words: int, index: tuple) -> np.ndarray:
  """Positions (uint32, wrapping) of the words of ``x[index]`` among those of the whole
  array ``x`` of ``shape`` (``words`` per element), in the layout ``_leaf_digest`` numbers."""
  strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) * words for i in range(len(shape))]
  ranges = [np.arange(*s.indices(n), dtype=np.uint64) for s, n in zip(index, shape, strict=True)]
  grids = np.ix_(*ranges, np.arange(words, dtype=np.uint64))
  position = sum(g * np.uint64(stride) for g, stride in zip(grids, [*strides, 1], strict=True))
  return (position % np.uint64(2**32)).astype(np.uint32)


def _host_part(x) -> np.ndarray:
  """``_host_sums`` of the part of ``x`` this process holds: each shard of replica 0 (so
  every element of a global array counts once, over all processes) at its global place."""
  dtype = jax.dtypes.canonicalize_dtype(x.dtype)  # float64 is float32 without x64, as on device
  words = max(np.dtype(dtype).itemsize // 4, 1)
  if not isinstance(x, jax.Array):
    x = np.asarray(x).astype(dtype)
    return _host_sums(x, _word_positions(x.shape, words, tuple(slice(None) for _ in x.shape)))
  total = np.zeros(3, np.uint32)
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      data = np.asarray(shard.data).astype(dtype)
      total += _host_sums(data, _word_positions(x.shape, words, shard.index))
  return total


def _on_host(x, host_max_elements: int) -> bool:
  return np.size(x) <= host_max_elements


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
    host_max_elements: leaves of at most this many elements are hashed by
      numpy on the host, each process its own shards (the parts of leaves
      that span processes are added up by one allgather); the others under
      jit (the same digest either way).

  Returns:
    ``({keystr(path): 16 hex digits}, [keystr(path) of non-finite leaves])``.
    The digest depends only on each array's shape, dtype and values.
  """
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  sums = {}
  spanning = []  # leaves held in part by other processes: their host parts are added below
  for path, x in zip(paths, jax.tree_util.tree_leaves(tree), strict=True):
    # Each leaf's result is read before the next program starts: on a mesh these programs
    # reduce across devices, and several in flight at once deadlocked XLA:CPU's collectives
    # (8 fake devices on 2 cores, a rendezvous that never completed).
    if _on_host(x, host_max_elements):
      sums[path] = _host_part(x)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        spanning.append(path)
    else:
      digest, finite = _leaf_digest_and_finite(x)
      sums[path] = np.append(_to_host(digest), np.uint32(not bool(_to_host(finite))))
  if spanning:  # one collective for all of them, in the same order in every process
    from jax.experimental import multihost_utils

    parts = multihost_utils.process_allgather(np.stack([sums[p] for p in spanning]))
    for path, total in zip(spanning, np.sum(parts, axis=0, dtype=np.uint32), strict=True):
      sums[path] = total
  digests = {path: f"{int(v[0]):08x}{int(v[1]):08x}" for path, v in sums.items()}
  return digests, [path for path, v in sums.items() if v[2]]


def compare_digests(saved: dict[str, str], current: dict[str, str]) -> list[str]:
  """Paths whose digest differs from (or is missing in) ``saved``."""
  return sorted(p for p in set(saved) | set(current) if saved.get(p) != current.get(p))
