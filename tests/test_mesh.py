"""Particles across devices and processes: the same math on any mesh.

Fake CPU devices need XLA_FLAGS before JAX starts, and jax.distributed needs
fresh processes, so the runs happen in subprocesses (tests/*_worker.py).
"""

import json
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from swamp_jax import distributed

from . import equivalence
from .conftest import REPO, compute_once_per_session, create_fake_device_env


def _env(num_devices):
  return create_fake_device_env(num_devices)


def _worker(out, num_devices, *args, timeout=600):
  proc = subprocess.run(
    [sys.executable, str(REPO / "tests" / "mesh_worker.py"), "--out", str(out), *args],
    env=_env(num_devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return np.load(out)


# The run of mesh_worker.make_config(): LeNet-5 on digits (1,437 training images, batches of
# 64: 22 steps an epoch), 1 epoch to the rewind point and 2 rounds of 1 epoch.
RUN_STEPS = 22 * (1 + 2 * 1)
# A mesh, or another process count, splits each batch's sums (the weight gradients' sums over
# 64 images x 8x8 positions = 4,096 terms) and may block the layers' matmuls differently:
# 5 layers, forward and backward.
LENET5_LAYERS = 5
RUN_RTOL = equivalence.training_rtol(RUN_STEPS, 64 * 8 * 8, depth=2 * LENET5_LAYERS)

# The BatchNorm tests (BN steps on a mesh, the two-process runs) use mesh_worker's small
# BatchNorm CNN: 2 convs, 2 BatchNorms and the head, 5 reductions in sequence forward and as
# many backward, at a fraction of WRN-10-1's compile time. The two-process runs have 2
# particles, one in each process, launched from the command line with mesh_worker's config.
TWO_PROCESS_CONFIG = "tests/mesh_worker.py:small_bn,2"
SMALL_BN_LAYERS = 5
SMALL_BN_RTOL = equivalence.training_rtol(RUN_STEPS, 64 * 8 * 8, depth=2 * SMALL_BN_LAYERS)


def _leaves(npz, prefix):
  return {k[len(prefix) :]: npz[k] for k in npz if k.startswith(prefix)}


def _assert_same_run(a, b, rtol=RUN_RTOL, layers=LENET5_LAYERS):
  """Two programs' runs of one config (``b`` recorded with --reference) agree up to float32
  reordering: weights normwise, the mask but for near-ties of the threshold, accuracies but
  for near-ties of the top two logits (tests/equivalence.py)."""
  assert sorted(_leaves(a, "params")) == sorted(_leaves(b, "params"))
  for prefix in ("params", "bs"):
    expected = _leaves(b, prefix)
    scale = equivalence.tree_scale(expected)
    for key, value in expected.items():
      equivalence.assert_close_normwise(a[prefix + key], value, rtol, prefix + key, scale)
  kernels = {k: v for k, v in _leaves(b, "pruned_from").items() if k.endswith("['kernel']")}
  equivalence.assert_masks_agree_except_near_the_threshold(
    _leaves(a, "mask"), _leaves(b, "mask"), kernels, rtol
  )
  # Logits move with the weights of every layer they pass through.
  logit_rtol = layers * rtol
  for r, accuracy in enumerate(b["accuracy"]):
    logits = b[f"logits_average_{r}"]
    equivalence.assert_accuracies_agree(a["accuracy"][r], accuracy, logits, logit_rtol)
    for i, particle_accuracy in enumerate(b["particle_accuracy"][r]):
      logits = b[f"logits_particles_{r}"][i]
      equivalence.assert_accuracies_agree(
        a["particle_accuracy"][r][i], particle_accuracy, logits, logit_rtol
      )


def _reference(tmp_path, **config):
  """mesh_worker's run in this process, on one device (the suite's one CPU device)."""
  import swamp_jax

  from .mesh_worker import flatten_result, make_config, record_reference

  assert len(jax.devices()) == 1
  c = make_config(particle_axis=1, data_axis=1, **config)
  out = swamp_jax.run(c, str(tmp_path))
  flat = flatten_result(out)
  flat.update(record_reference(c, str(tmp_path), out.rounds))
  return flat


def _copy_as_if_stopped_in_the_last_round(finished, work):
  """A copy of the finished run's workdir ``finished`` at ``work`` that lost everything after
  its last checkpoint (in round 1): no final model, only round 0's results line."""
  import shutil

  shutil.copytree(finished, work)
  shutil.rmtree(work / "final_model")
  (work / "results.jsonl").write_text((work / "results.jsonl").read_text().splitlines()[0] + "\n")


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory):
  """The 4 x 2 mesh run (8 fake devices) with its workdir, shared by two tests: computed
  once per session, whichever pytest-xdist worker asks first (the workdir is read-only)."""

  def compute(folder):
    args = ("--particle_axis=4", "--data_axis=2", f"--workdir={folder / 'work'}")
    _worker(folder / "mesh.npz", 8, *args)

  folder = compute_once_per_session(tmp_path_factory, "sharded_run", compute)
  return np.load(folder / "mesh.npz"), folder / "work"


def test_mesh_of_4_particles_by_2_data_equals_one_device(sharded_run, tmp_path):
  sharded, _ = sharded_run
  assert str(sharded["mesh"]) == '{"particle": 4, "data": 2}' and int(sharded["devices"]) == 8
  _assert_same_run(sharded, _reference(tmp_path))


def test_batchnorm_steps_with_the_batch_split_over_data_equal_one_device(tmp_path):
  # Both in one process with 4 fake devices: without a mesh (device 0), and on a 2 x 2 mesh.
  proc = subprocess.run(
    [sys.executable, str(REPO / "tests" / "bn_step_worker.py"), str(tmp_path)],
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = {name: np.load(tmp_path / f"{name}.npz") for name in ("none", "mesh")}
  a, b = results["none"], results["mesh"]
  # 2 steps of the small BatchNorm CNN (SMALL_BN_LAYERS reductions in sequence forward, as
  # many backward) whose batch of 64 images of 8x8 is split over 2 devices: the batch
  # statistics and the weight gradients sum 4,096 terms in another order.
  rtol = equivalence.training_rtol(2, 64 * 8 * 8, depth=2 * SMALL_BN_LAYERS)
  # One scale for the network's state; the losses are a quantity of their own.
  state = [k for k in a.files if k.startswith("state")]
  scale = equivalence.tree_scale({k: a[k] for k in state})
  for key in state:
    equivalence.assert_close_normwise(b[key], a[key], rtol, key, scale)
  equivalence.assert_close_normwise(b["losses"], a["losses"], rtol, "losses")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two_processes(work, *overrides):
  """The run of TWO_PROCESS_CONFIG in 2 processes (gloo) on ``work``, from the command line
  (``overrides``: more ``--config.field=value`` arguments)."""
  port = _free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "swamp_jax",
        "--config",
        TWO_PROCESS_CONFIG,
        f"--workdir={work}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        "--cpu_collectives=gloo",
        "--heartbeat_timeout_seconds=10",
        *overrides,
      ],
      cwd=REPO,
      env=_env(1),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


def _finish(procs, timeout=600):
  try:
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errors, strict=True):
    assert p.returncode == 0, err[-4000:]


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
  """The uninterrupted two-process run's workdir, computed once per session."""

  def compute(folder):
    _finish(_launch_two_processes(folder / "work"))

  return compute_once_per_session(tmp_path_factory, "two_process_run", compute) / "work"


@pytest.fixture(scope="session")
def two_process_streamed_run(tmp_path_factory):
  """The two-process run with its training batches streamed from the host (each process
  reads only its particle's rows), computed once per session."""

  def compute(folder):
    _finish(_launch_two_processes(folder / "work", "--config.dataset.pipeline=stream"))

  return compute_once_per_session(tmp_path_factory, "two_process_streamed_run", compute) / "work"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
  """TWO_PROCESS_CONFIG's run in this process, on one device, with what the comparisons need."""
  return _reference(tmp_path_factory.mktemp("one"), model="small_bn", num_particles=2)


def test_two_processes_with_batchnorm_give_the_result_of_one(two_process_run, one_process_run):
  from .mesh_worker import flatten_workdir

  two = flatten_workdir(two_process_run)
  # Padding rows of the split training set must not enter the BN recompute: they would change
  # its batches (the permutation's length) and every recomputed statistic.
  _assert_same_run(two, one_process_run, SMALL_BN_RTOL, layers=SMALL_BN_LAYERS)
  # Results written once, not once per process.
  assert len((two_process_run / "results.jsonl").read_text().splitlines()) == 2


def test_two_processes_streaming_their_batches_give_the_result_of_one(
  two_process_streamed_run, one_process_run
):
  from .mesh_worker import flatten_workdir

  # Each process streams its particle's batches from the host (another program than the
  # in-device gather, the same math): within the tolerance of the in-device comparison.
  two = flatten_workdir(two_process_streamed_run)
  _assert_same_run(two, one_process_run, SMALL_BN_RTOL, layers=SMALL_BN_LAYERS)
  config = json.loads((two_process_streamed_run / "config.json").read_text())
  assert config["dataset"]["pipeline"] == "stream"
  assert len((two_process_streamed_run / "results.jsonl").read_text().splitlines()) == 2


def test_checkpoint_of_two_processes_resumes_in_one_with_its_digests_intact(
  two_process_run, tmp_path
):
  import swamp_jax
  from swamp_jax import checkpointing

  from .mesh_worker import make_config

  # Each process digested only the shards it held: the sums must be those of the whole arrays,
  # or this one-process resume moves the checkpoint aside as damaged (and falls back).
  work = tmp_path / "work"
  _copy_as_if_stopped_in_the_last_round(two_process_run, work)
  newest = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert newest == 55  # mid-round 1, after the prune
  swamp_jax.run(make_config("small_bn", 2), str(work))
  assert not (work / (checkpointing.CHECKPOINT_DIR + checkpointing.QUARANTINE_SUFFIX)).exists()
  assert len((work / "results.jsonl").read_text().splitlines()) == 2


def test_two_processes_killed_mid_round_resume_to_the_uninterrupted_result(
  two_process_run, tmp_path
):
  from .mesh_worker import flatten_workdir

  work = tmp_path / "work"
  procs = _launch_two_processes(work)
  try:
    # Checkpoint 55 is half-way through round 1 (44..66), after a prune, with one particle
    # (and its shard of the state) in each process.
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "checkpoints" / "55").exists():
      assert procs[0].poll() is None and procs[1].poll() is None, "finished before the kill"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=180)  # never a hang
  finally:
    for p in procs:
      p.kill()
  # The survivor stops (never hangs in a collective) with an error naming the lost peer.
  assert procs[0].returncode != 0, err[-3000:]
  assert "heartbeat" in err or "Connection closed by peer" in err, err[-3000:]
  assert not (work / "final_model").exists()
  # Both restarted with the same command: the run resumes from its checkpoints and ends
  # exactly as the uninterrupted one (the same program: bit-identical).
  _finish(_launch_two_processes(work))
  resumed, uninterrupted = flatten_workdir(work), flatten_workdir(two_process_run)
  assert sorted(resumed) == sorted(uninterrupted)
  for key, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  assert len((work / "results.jsonl").read_text().splitlines()) == 2


def test_train_size_with_several_processes_is_refused_naming_the_field(monkeypatch, tiny_config):
  from swamp_jax import run_setup

  tiny_config.dataset.train_size = 100
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"dataset.train_size=100 is not supported with 2 proc"):
    run_setup.check_config_inputs(tiny_config)


def test_checkpoint_from_an_8_device_mesh_resumes_on_one_device(sharded_run, tmp_path):
  import swamp_jax

  from .mesh_worker import make_config

  reference, finished = sharded_run
  work = tmp_path / "work"
  # Lose everything after the last checkpoint of the 8-device run, then resume here.
  _copy_as_if_stopped_in_the_last_round(finished, work)
  assert len(jax.devices()) == 1
  resumed = swamp_jax.run(make_config(), str(work))
  flat = {
    f"params{jax.tree_util.keystr(p)}": np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(resumed.params)
  }
  # The steps after the newest checkpoint (in round 1) were trained here on one device, the
  # rest on 8: within the whole run's tolerance (as in the mesh test).
  scale = equivalence.tree_scale({k: reference[k] for k in flat})
  for key, value in flat.items():
    equivalence.assert_close_normwise(value, reference[key], RUN_RTOL, key, scale)
  assert len((work / "results.jsonl").read_text().splitlines()) == 2


def test_models_saved_on_an_8_device_mesh_load_on_1(sharded_run):
  import swamp_jax

  _, work = sharded_run
  assert len(jax.devices()) == 1
  last = swamp_jax.load_round_model(str(work), 1)
  assert last["particle_params"]["head"]["kernel"].shape[0] == 4  # the particle axis
  final = swamp_jax.load_final_model(str(work / "final_model"))
  for a, b in zip(
    jax.tree_util.tree_leaves(last["params"]),
    jax.tree_util.tree_leaves(final["params"]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  ticket = swamp_jax.load_final_model(str(work / "ticket"))
  assert set(ticket) == {"params", "batch_stats"}


def test_particle_counts_that_do_not_divide_the_mesh_are_refused_with_the_sizes_that_work():
  devices = [jax.devices()[0]] * 8  # shapes only: an 8-device list without 8 devices
  with pytest.raises(ValueError, match=r"num_particles=3 is not a multiple.*=2.*\[1\]"):
    distributed.create_mesh(3, particle_axis=2, devices=devices)
  assert distributed.valid_particle_axis_sizes(4, 8) == [1, 2, 4]
  assert distributed.valid_particle_axis_sizes(6, 8) == [1, 2]
  with pytest.raises(ValueError, match="needs 4 devices, but 1 are present"):
    distributed.create_mesh(4, particle_axis=2, data_axis=2)


def test_batch_not_divisible_by_the_data_axis_is_refused():
  import types

  distributed.check_batch_size(128, types.SimpleNamespace(data_axis=4))
  with pytest.raises(ValueError, match=r"batch_size=100 is not divisible .*\(8 devices"):
    distributed.check_batch_size(100, types.SimpleNamespace(data_axis=8))
