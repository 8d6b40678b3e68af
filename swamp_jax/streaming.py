"""Streamed input: per-particle batches read from a random-access source by grain.

For training sets that do not fit in device memory (``dataset.pipeline``).
Each particle visits the training set in exactly the order the in-device path
gathers inside jit: ``data.compute_epoch_permutation(key, epoch, n)``, the
same function on the same keys, evaluated here once per epoch and sliced into
batches. A grain ``MapDataset`` over the epoch's index blocks reads the
records (a TFDS ``data_source``: array_record, no TensorFlow; or numpy arrays)
and decodes and augments them, in ``worker_count`` host processes, and each
process reads only the block of [particles, batch rows] its devices hold.

Resuming needs no iterator state: the orders are a pure function of (particle
key, epoch, step), the keys are in the checkpointed particle states, and the
checkpoint records (phase, step); a host augmentation draws from (key, epoch,
example). A stream started at the checkpoint's step therefore yields exactly
the batches an uninterrupted stream yields there, which saving grain's
iterator state would only duplicate (and tie to the worker count).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from swamp_jax import augmentation, distributed, particles
from swamp_jax import data as data_lib

PIPELINES = ("auto", "device", "stream")
TRANSFORMS = ("none", "imagenet")
# 'auto' keeps the training set in device memory while it takes at most this share of one
# device's memory: a replica sits on every device, next to N particles' weights, optimizer
# and SWA states, activations and the evaluation sets, for which the rest is left.
AUTO_DEVICE_FRACTION = 0.25
_HOST_BATCHES_AHEAD = 2  # grain's read-ahead, in whole [N, batch] blocks (bounded host memory)
# Host images per device call: a stack of steps trains in one compiled loop; ImageNet-size
# batches go one step at a time.
STACK_BYTES = 64 << 20


class ArraySource:
  """A random-access source over numpy arrays: stored images [n, H, W, C], labels [n]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index], "label": self.labels[index]}

  def __getitems__(self, indices):
    return [self[int(i)] for i in indices]

  def read_arrays(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``indices`` in one gather (no per-record dicts)."""
    return self.images[indices], self.labels[indices]


class RowsSource:
  """The rows ``rows`` of ``source`` (a training subset), as a source of their own."""

  def __init__(self, source, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index):
    return self.source[int(self.rows[index])]

  def __getitems__(self, indices):
    return read_records(self.source, self.rows[np.asarray(indices, np.int64)])


def read_records(source, indices) -> list:
  """Records ``indices`` of ``source`` (batched reads where the source has them)."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


@functools.partial(jax.jit, static_argnums=2)
def _compute_permutations(keys, epoch, num_examples: int):
  return jax.vmap(lambda key: data_lib.compute_epoch_permutation(key, epoch, num_examples))(keys)


def compute_permutations(keys, epoch: int, num_examples: int) -> np.ndarray:
  """Each particle's order of ``epoch``, int64 [k, num_examples], on the host.

  ``data.compute_epoch_permutation`` lifted over the keys [k, 2] as the
  in-device step lifts it, so the orders are the in-device ones.
  """
  perms = _compute_permutations(np.asarray(keys, np.uint32), np.int32(epoch), num_examples)
  return np.asarray(jax.device_get(perms)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class BatchReader:
  """The grain map of one step: an index block int [k, b] -> (images [k, b, ...], int32
  labels [k, b]); ``keys`` [k, 2] are the block's particles' keys."""

  source: Any
  keys: np.ndarray
  epoch: int
  transform: str = "none"
  image_size: int = augmentation.IMAGE_SIZE

  def __call__(self, block):
    block = np.asarray(block)
    if self.transform == "none" and hasattr(self.source, "read_arrays"):
      images, labels = self.source.read_arrays(block.reshape(-1))
      return images.reshape(*block.shape, *images.shape[1:]), labels.astype(np.int32).reshape(
        block.shape
      )
    records = read_records(self.source, block.reshape(-1))
    labels = np.asarray([r["label"] for r in records], np.int32).reshape(block.shape)
    if self.transform == "imagenet":
      owners = np.repeat(np.arange(block.shape[0]), block.shape[1])
      images = [
        augmentation.random_resized_crop_and_flip(
          np.asarray(r["image"]),
          augmentation.example_rng(self.keys[p], self.epoch, example),
          self.image_size,
        )
        for r, p, example in zip(records, owners, block.reshape(-1), strict=True)
      ]
    else:
      images = [np.asarray(r["image"]) for r in records]
    images = np.stack(images)
    return images.reshape(*block.shape, *images.shape[1:]), labels


def compute_process_block(sharding, global_shape) -> tuple[slice, ...]:
  """The block of ``global_shape`` this process's devices hold under ``sharding``
  (a rectangle: devices of one process are contiguous in the mesh)."""
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  block = []
  for dim, size in enumerate(global_shape):
    starts = [idx[dim].start or 0 for idx in index_map.values()]
    stops = [size if idx[dim].stop is None else idx[dim].stop for idx in index_map.values()]
    block.append(slice(min(starts), max(stops)))
  return tuple(block)


def batch_sharding(num_particles: int, placement) -> NamedSharding | None:
  """Stacked batches [steps, N, batch, ...]: particles over 'particle' (when N divides),
  rows over 'data'."""
  if placement is None:
    return None
  particle = distributed.PARTICLE if placement.particles(num_particles).spec != P() else None
  return NamedSharding(placement.mesh, P(None, particle, distributed.DATA))


def iterate_host_batches(
  source,
  keys,
  start_step: int,
  end_step: int,
  batch_size: int,
  *,
  particle_rows: slice = slice(None),
  batch_rows: slice = slice(None),
  transform: str = "none",
  image_size: int = augmentation.IMAGE_SIZE,
  worker_count: int = 0,
):
  """Host batches of global steps [start_step, end_step), one grain pipeline per epoch.

  Args:
    source: random-access records ``{'image', 'label'}`` (the training set).
    keys: every particle's data-order key, uint32 [N, 2].
    particle_rows, batch_rows: this process's block of the [N, batch] rows;
      only these records are read.
    transform: 'none' (stored images) or 'imagenet' (random-resized crop and
      flip to ``image_size``, drawn from (key, epoch, example)).
    worker_count: grain worker processes (0: threads of this process).

  Yields:
    (images [k, b, ...], int32 labels [k, b]) numpy, k and b this process's
    particles and batch rows.
  """
  import grain

  keys = np.asarray(keys, np.uint32)[particle_rows]
  n = len(source)
  spe = data_lib.steps_per_epoch(n, batch_size)
  step = start_step
  while step < end_step:
    epoch, first = divmod(step, spe)
    last = min(spe, first + end_step - step)
    order = compute_permutations(keys, epoch, n)[:, : spe * batch_size]
    blocks = order.reshape(len(keys), spe, batch_size)[:, first:last, batch_rows]
    read = grain.ReadOptions(num_threads=_HOST_BATCHES_AHEAD, prefetch_buffer_size=2)
    reader = BatchReader(source, keys, epoch, transform, image_size)
    ds = grain.MapDataset.source(np.ascontiguousarray(blocks.transpose(1, 0, 2))).map(reader)
    yield from iterate_in_workers(ds.to_iter_dataset(read), worker_count)
    step += last - first


def iterate_in_workers(ds, worker_count: int):
  """The elements of the grain ``IterDataset`` ``ds``, read by ``worker_count`` worker
  processes (0: threads of this process); the workers end with the iteration."""
  import grain

  if worker_count > 0:
    mark_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  iterator = iter(ds)
  try:
    yield from iterator
  finally:
    if hasattr(iterator, "close"):
      iterator.close()


def mark_flags_parsed() -> None:
  """grain 0.2.18's worker processes read an absl flag, which raises before absl parsed
  the command line (a program not started by absl.app): use the flags' defaults then."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def put_batches(host_batches, num_particles: int, batch_size: int, placement=None):
  """Host batches of consecutive steps, stacked into global device arrays: images
  [steps, N, batch, ...] and int32 labels [steps, N, batch] (each process gives its block)."""
  images = np.stack([x for x, _ in host_batches])
  labels = np.stack([y for _, y in host_batches])
  sharding = batch_sharding(num_particles, placement)
  if sharding is None:
    return jax.device_put((images, labels))
  steps = len(host_batches)
  shapes = (
    (steps, num_particles, batch_size, *images.shape[3:]),
    (steps, num_particles, batch_size),
  )
  return tuple(
    jax.make_array_from_process_local_data(sharding, x, shape)
    for x, shape in zip((images, labels), shapes, strict=True)
  )


def train_batch(states, mask, step, images, labels, mean, std, *, model, tx, spec, placement=None):
  """One step of every particle on streamed batches images [N, b, ...], labels [N, b]:
  ``particles.train_step_on_batch`` lifted over the particles. Returns (states, loss [N])."""
  n = states.key.shape[0]
  step_fn = particles.lift_over_particles(
    functools.partial(particles.train_step_on_batch, model=model, tx=tx, spec=spec),
    n,
    placement,
    in_axes=(0, None, 0, 0, None, None, None),
  )
  states, loss = step_fn(states, step, images, labels, mask, mean, std)
  return particles.constrain_particles(states, n, placement), loss


def train_batches(
  states, mask, start_step, images, labels, mean, std, *, model, tx, spec, placement=None
):
  """Steps from ``start_step`` on stacked batches images [k, N, b, ...], labels [k, N, b],
  one compiled loop (``lax.scan``, as ``particles.train_steps``: on CPUs a loop of k steps
  runs faster than k calls). Returns (states, losses float32 [k, N])."""
  n = states.key.shape[0]
  step_fn = functools.partial(train_batch, model=model, tx=tx, spec=spec, placement=placement)

  def body(states, xs):
    return step_fn(states, mask, *xs, mean, std)

  steps = start_step + jax.numpy.arange(images.shape[0], dtype=jax.numpy.int32)
  init = particles.constrain_particles(states, n, placement)
  states, losses = jax.lax.scan(body, init, (steps, images, labels))
  if placement is not None:  # every process reads the losses (progress, divergence check)
    losses = jax.lax.with_sharding_constraint(losses, placement.replicated)
  return states, losses


@dataclasses.dataclass(frozen=True)
class TrainStream:
  """A run's streamed training set and its jitted per-step programs.

  ``steps`` maps 'pretrain' / 'rounds' to ``train_batch`` jitted for that
  phase's optimizer and step spec.
  """

  source: Any
  batch_size: int
  transform: str
  image_size: int
  worker_count: int
  mean: jax.Array
  std: jax.Array
  placement: Any
  steps: dict

  def _block(self, num_particles: int):
    sharding = batch_sharding(num_particles, self.placement)
    if sharding is None:
      return slice(None), slice(None)
    return compute_process_block(sharding, (1, num_particles, self.batch_size))[1:]

  def batches(self, keys, start_step: int, end_step: int):
    """Host batches of [start_step, end_step) for particles with ``keys`` [N, 2]: this
    process's block of each step's [N, batch] rows (``iterate_host_batches``)."""
    particle_rows, batch_rows = self._block(int(np.shape(keys)[0]))
    return iterate_host_batches(
      self.source,
      keys,
      start_step,
      end_step,
      self.batch_size,
      particle_rows=particle_rows,
      batch_rows=batch_rows,
      transform=self.transform,
      image_size=self.image_size,
      worker_count=self.worker_count,
    )

  def train(self, pretrain: bool, states, mask, batches, start_step: int, num_steps: int):
    """``num_steps`` steps from ``start_step`` on the next ``batches``; (states, losses [n, N]).

    Steps go to the device in stacks of at most ``STACK_BYTES`` of images, counted from
    ``start_step``: the same stacks, so the same programs, wherever a run resumed (the
    pieces ``train_phase`` asks for are). Calls return before the device finishes, so the
    next stack is read while the last one trains.
    """
    program = self.steps["pretrain" if pretrain else "rounds"]
    n = int(states.key.shape[0])
    losses, step = [], start_step
    while step < start_step + num_steps:
      first = next(batches)
      per_step = first[0].nbytes
      k = int(min(start_step + num_steps - step, max(1, STACK_BYTES // max(per_step, 1))))
      group = [first] + [next(batches) for _ in range(k - 1)]
      images, labels = put_batches(group, n, self.batch_size, self.placement)
      states, loss = program(states, mask, np.int32(step), images, labels, self.mean, self.std)
      losses.append(loss)
      step += k
    return states, jax.numpy.concatenate(losses)


def create_step_program(model, tx, spec, placement=None):
  """``train_batches`` jitted, particle states donated."""
  return jax.jit(
    functools.partial(train_batches, model=model, tx=tx, spec=spec, placement=placement),
    donate_argnums=(0,),
  )


def device_memory_bytes() -> int:
  """Memory of one local device (bytes_limit where the backend reports it; on CPUs,
  the host's physical memory shared by the local devices)."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return total // max(1, jax.local_device_count())


def choose_pipeline(pipeline: str, num_examples: int, image_shape, itemsize: int) -> str:
  """'device' or 'stream' for ``dataset.pipeline``.

  'auto' streams images without a fixed shape (they are cropped on the host)
  and training sets larger than ``AUTO_DEVICE_FRACTION`` of one device's memory.
  """
  if pipeline not in PIPELINES:
    raise ValueError(f"dataset.pipeline must be one of {PIPELINES}, got {pipeline!r}")
  if pipeline != "auto":
    return pipeline
  if any(d is None for d in image_shape):
    return "stream"
  size = num_examples * math.prod(image_shape) * itemsize
  return "device" if size <= AUTO_DEVICE_FRACTION * device_memory_bytes() else "stream"
