"""Device meshes for particles: a 'particle' axis and a 'data' axis.

Particles are independent until they are averaged, so the particle axis of
every particle leaf is split over the mesh's ``particle`` axis; within a
particle, the batch is split over the ``data`` axis. Everything is explicit
``NamedSharding`` under ``jit`` (no pmap, no hand-written collectives): XLA
turns the mean over particles into a collective over ``particle``, and the
gradient and BatchNorm means over the batch into collectives over ``data``.
The math is the same on any mesh, so results match a single device up to
float reassociation.

Several processes (a TPU pod, a multi-node GPU job, or processes on one
machine) call ``initialize`` first; the same command then works everywhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PARTICLE, DATA = "particle", "data"


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  cpu_collectives: str | None = None,
  heartbeat_timeout_seconds: int = 100,
) -> None:
  """Starts JAX's multi-process runtime (a no-op for one process).

  With no arguments JAX detects the cluster (TPU pods, SLURM, ...). On CPUs
  (tests, localhost), pass the coordinator, the process count and this
  process's id; ``cpu_collectives='gloo'`` enables cross-process CPU
  collectives. A process that dies is noticed by the others within
  ``heartbeat_timeout_seconds``, which then stop with an error instead of
  waiting forever in a collective.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  kwargs = {
    k: v
    for k, v in dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    ).items()
    if v is not None
  }
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def valid_particle_axis_sizes(num_particles: int, num_devices: int) -> list[int]:
  """Particle-axis sizes that divide both N and the device count."""
  return [p for p in range(1, num_devices + 1) if num_devices % p == 0 and num_particles % p == 0]


def create_mesh(
  num_particles: int, particle_axis: int = 0, data_axis: int = 0, devices=None
) -> Mesh:
  """A ('particle', 'data') mesh for ``num_particles`` particles.

  Args:
    num_particles: N, the most particles any round trains.
    particle_axis: size of the particle axis; 0 picks the largest size that
      divides both N and the device count.
    data_axis: size of the data axis; 0 gives it the remaining devices.
    devices: devices to use (default: all, across all processes).

  Raises:
    ValueError: the sizes do not fit N or the devices; the message lists the
      particle-axis sizes that work.
  """
  devices = list(jax.devices() if devices is None else devices)
  d = len(devices)
  valid = valid_particle_axis_sizes(num_particles, d)
  if particle_axis == 0:
    fitting = [p for p in valid if data_axis == 0 or p * data_axis <= d]
    if not fitting:
      raise ValueError(
        f"a mesh with mesh.data_axis={data_axis} needs at least {data_axis} devices, "
        f"but {d} are present"
      )
    particle_axis = max(fitting)
  if num_particles % particle_axis:
    raise ValueError(
      f"num_particles={num_particles} is not a multiple of mesh.particle_axis={particle_axis}; "
      f"with {d} devices, particle-axis sizes that work are {valid}"
    )
  if data_axis == 0:
    if d % particle_axis:
      raise ValueError(
        f"mesh.particle_axis={particle_axis} does not divide the {d} devices; "
        f"sizes that work for num_particles={num_particles}: {valid}"
      )
    data_axis = d // particle_axis
  if particle_axis * data_axis > d:
    raise ValueError(
      f"a mesh of {particle_axis} particles x {data_axis} data needs "
      f"{particle_axis * data_axis} devices, but {d} are present"
    )
  used = np.asarray(devices[: particle_axis * data_axis]).reshape(particle_axis, data_axis)
  return Mesh(used, (PARTICLE, DATA), axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where each kind of array lives on a mesh."""

  mesh: Mesh

  @property
  def particle_axis(self) -> int:
    return self.mesh.shape[PARTICLE]

  @property
  def data_axis(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def multi_process(self) -> bool:
    return len({dev.process_index for dev in self.mesh.devices.flat}) > 1

  def particles(self, num_particles: int) -> NamedSharding:
    """Leading particle axis split over 'particle' (replicated when N does not divide,
    e.g. SWAMP+'s single-particle rounds)."""
    if num_particles % self.particle_axis:
      return self.replicated
    return NamedSharding(self.mesh, P(PARTICLE))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def replicate(self, tree):
    """A copy of ``tree`` on every device of the mesh.

    Goes through host numpy: ``device_put`` of a process-local ``jax.Array``
    onto a sharding spanning several processes makes a broken global array.
    """
    return jax.device_put(jax.device_get(tree), self.replicated)

  @property
  def batch(self) -> NamedSharding:
    """One particle's batch: examples split over 'data' (inside the particle lift)."""
    return NamedSharding(self.mesh, P(DATA))

  @property
  def dataset(self) -> NamedSharding:
    """The in-memory training set: replicated within one process; split over all
    devices when several processes hold it, so each process keeps only its rows."""
    if self.multi_process:
      return NamedSharding(self.mesh, P((PARTICLE, DATA)))
    return self.replicated


def check_batch_size(batch_size: int, placement: Placement) -> None:
  if batch_size % placement.data_axis:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the mesh's data axis "
      f"({placement.data_axis} devices per particle)"
    )


def put_process_rows(
  array: np.ndarray, sharding: NamedSharding, global_rows: int, row_offset: int
) -> jax.Array:
  """A global array whose rows [row_offset, row_offset + len(array)) this process holds.

  With a replicated sharding the array must be the whole thing.
  """
  if sharding.spec == P():
    return jax.device_put(array, sharding)
  global_shape = (global_rows, *array.shape[1:])
  index_map = sharding.addressable_devices_indices_map(global_shape)

  def rows(index):
    sl = index[0]
    start, stop = sl.start or 0, global_rows if sl.stop is None else sl.stop
    return array[start - row_offset : stop - row_offset]

  arrays = [jax.device_put(rows(idx), dev) for dev, idx in index_map.items()]
  return jax.make_array_from_single_device_arrays(global_shape, sharding, arrays)


def rows_per_process(num_rows: int, placement: Placement) -> tuple[int, int, int]:
  """(padded global rows, first row, row count) this process must hold."""
  n_dev = placement.mesh.devices.size
  padded = math.ceil(num_rows / n_dev) * n_dev
  if not placement.multi_process:
    return num_rows, 0, num_rows
  per_dev = padded // n_dev
  mine = [
    i
    for i, dev in enumerate(placement.mesh.devices.flat)
    if dev.process_index == jax.process_index()
  ]
  return padded, mine[0] * per_dev, len(mine) * per_dev


def to_host(tree):
  """Host numpy copies of fully replicated (or single-process) arrays."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))

  return jax.tree_util.tree_map(get, tree)
