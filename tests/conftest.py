"""Shared fixtures.

The suite runs on one CPU device; tests of meshes start subprocesses with
fake CPU devices (XLA_FLAGS must be set before JAX starts).
"""

import os
import pathlib
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache per test session, shared with the subprocesses that
# tests start: a killed run and its resumption, a sweep run three times, the processes of a
# mesh test compile the same programs again. A fresh directory every session, so nothing
# outlives it; set before JAX is imported (its config reads the environment then). A cached
# executable is the one the compiler made, so no result changes.
# No size limit (JAX_COMPILATION_CACHE_MAX_SIZE): with one, JAX's LRUCache (jax 0.10) lists,
# stats and reads the access-time file of every entry on every write, under a directory lock.
# The suite writes ~2,300 entries, so that scan grew with each of them: with a 4 GiB limit
# the whole suite took 1.4x the CPU time (back-to-back runs on 2 cores: 866 s vs 616 s
# user+sys, 541 s vs 336 s wall). Without a limit, writes and reads take no lock, so a
# process may read an entry that another is still writing (only when two compile the same
# program at once): JAX then warns "Error reading persistent compilation cache entry" (the
# zlib stream is truncated) and compiles the program itself, so a result never changes.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="swamp_jax_xla_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Decoded dataset arrays (config.dataset.cache_dir's default) in a folder of this session, so
# the suite never writes to the user's ~/.cache; inherited by workers and subprocesses.
_ARRAY_CACHE = None
if "SWAMP_JAX_CACHE_DIR" not in os.environ:
  _ARRAY_CACHE = os.environ["SWAMP_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="swamp_jax_arrays_")


# Most of the suite's time is XLA compiling small programs that then run for milliseconds
# (JAX_LOG_COMPILES: 25 of a 35 s mesh-worker run). JAX's documented switch for that case
# turns off LLVM's expensive backend passes (XLA's own HLO optimizations still run): the
# programs compute the same math, every assertion is unchanged, and comparisons of two
# programs use tolerances that hold for any reduction order. test_checkpointing.py took
# 0.78x the CPU time with it. Inherited by the subprocesses tests start; set it to 0 to run
# the suite on fully optimized code.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# With it, two XLA:CPU codegen settings that keep the math and halve what is left of the
# compile time (experiments/bench_compile_flags.py, three small runs: compile 0.54x, CPU
# 0.73x): the older loop emitters instead of the fusion emitters, and one LLVM module per
# program instead of pieces compiled on parallel threads (there is no idle core to run them
# on). Appended to the caller's XLA_FLAGS (an ISA limit, a device count), which tests pass
# on to the subprocesses they start.
_FAST_COMPILE_FLAGS = (
  "--xla_cpu_use_fusion_emitters=false",
  "--xla_cpu_parallel_codegen_split_count=1",
)
if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"):
  _flags = os.environ.get("XLA_FLAGS", "").split()
  _flags += [f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in " ".join(_flags)]
  os.environ["XLA_FLAGS"] = " ".join(_flags)


def pytest_sessionfinish(session, exitstatus):
  # The process that made the caches removes them (pytest-xdist's workers inherit their paths).
  for cache in (_XLA_CACHE, _ARRAY_CACHE):
    if cache is not None:
      shutil.rmtree(cache, ignore_errors=True)


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = REPO.parent / "shared" / "data" / "tensorflow_datasets"


def create_tiny_config(**overrides):
  """A digits config that trains in seconds: for end-to-end properties, not accuracy."""
  from swamp_jax.config import get_default_config

  c = get_default_config()
  c.dataset.name = "digits"
  c.model.name = "lenet300_100"
  c.num_particles = 2
  c.num_rounds = 2
  c.rewind_epochs = 1
  c.epochs_per_round = 2
  c.batch_size = 128
  c.optimizer.learning_rate = 0.05
  c.swa.learning_rate = 0.01
  c.swa.start = 0.5
  c.eval_batch_size = 512
  c.progress = False
  for field, value in overrides.items():
    group, _, name = field.rpartition("__")
    (c[group] if group else c)[name] = value
  return c


@pytest.fixture
def tiny_config():
  return create_tiny_config()


def create_fake_device_env(num_devices: int) -> dict:
  """This environment for a subprocess on ``num_devices`` fake CPU devices, keeping the
  caller's other XLA flags (e.g. --xla_cpu_max_isa=AVX2 to test another instruction set)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"]),
  }


def run_python_on_fake_devices(code: str, num_devices: int, timeout: int = 120):
  """``python -c code`` on ``num_devices`` fake CPU devices (the caller's other XLA flags
  kept); returns the CompletedProcess (text output)."""
  import subprocess
  import sys

  env = {**create_fake_device_env(num_devices), "PYTHONPATH": str(REPO)}
  return subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
  )


def compute_once_per_session(tmp_path_factory, name: str, compute):
  """``compute(folder)`` once for the whole test session, pytest-xdist workers included.

  The folder lies in the temporary root that all workers share; the first caller computes
  under a file lock while the others wait, and every later caller gets the folder as it is.
  ``compute`` must leave the folder complete (a marker file is written after it returns).
  """
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this session
  folder = root / f"shared_{name}"
  with FileLock(str(folder) + ".lock"):
    if not (folder / ".complete").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      compute(folder)
      (folder / ".complete").touch()
  return folder


# The slowest tests (seconds on 2 idle cores, from the README command's --durations), and
# the once-per-session run each waits for (compute_once_per_session). The suite runs on two
# pytest-xdist workers with --dist worksteal, which hands each worker one half of the
# collection and lets an idle worker take tests from the end of the other's queue. So the
# order below puts about half of the slow work at the start of each half (never the same
# shared run in both halves: one worker would wait for the other's), and the quick tests
# after them, where they fill the end. Serial runs just see another order.
_SLOW_TESTS = {
  "test_two_processes_with_batchnorm_give_the_result_of_one": ("two_process_run", 60),
  "test_two_processes_killed_mid_round_resume_to_the_uninterrupted_result": (
    "two_process_run",
    55,
  ),
  # Shares the one-process reference (a module fixture) with the first two-process test.
  "test_two_processes_streaming_their_batches_give_the_result_of_one": ("two_process_run", 45),
  "test_checkpoint_of_two_processes_resumes_in_one_with_its_digests_intact": (
    "two_process_run",
    6,
  ),
  "test_mesh_of_4_particles_by_2_data_equals_one_device": ("sharded_run", 65),
  "test_checkpoint_from_an_8_device_mesh_resumes_on_one_device": ("sharded_run", 9),
  "test_models_saved_on_an_8_device_mesh_load_on_1": ("sharded_run", 1),
  "test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result": (None, 40),
  "test_vit_prunes_its_attention_kernels_layerwise_at_exact_counts": ("user_model_test_vit", 15),
  "test_resumes_bit_identically_after_sigkill[test_vit]": ("user_model_test_vit", 32),
  "test_analyses_rebuild_the_registered_model_from_the_saved_run[test_vit]": (
    "user_model_test_vit",
    32,
  ),
  "test_nnx_model_by_name_trains_and_prunes_its_attention_kernels": ("user_model_test_nnx", 10),
  "test_resumes_bit_identically_after_sigkill[test_nnx]": ("user_model_test_nnx", 15),
  "test_analyses_rebuild_the_registered_model_from_the_saved_run[test_nnx]": (
    "user_model_test_nnx",
    25,
  ),
  "test_lottery_pools_of_a_user_model": ("user_model_test_nnx", 8),
  "test_analyses_of_a_sweep_folder": ("saved_runs", 30),
  "test_the_readme_section_on_your_own_model_data_and_pruning_rule_runs": (None, 26),
  "test_a_killed_sweep_resumes_its_interrupted_run_and_skips_finished_ones": (None, 18),
  "test_swamp_runs_to_the_end_on_streamed_imagenet_with_recomputed_batchnorm": (
    "streamed_imagenet",
    15,
  ),
  "test_streamed_imagenet_run_resumed_mid_round_is_bit_identical": ("streamed_imagenet", 4),
  "test_batchnorm_steps_with_the_batch_split_over_data_equal_one_device": (None, 13),
  "test_second_launch_is_refused_and_ctrl_c_ends_with_one_line_that_says_how_to_resume": (
    None,
    10,
  ),
}


def pytest_collection_modifyitems(session, config, items):
  groups = {}  # group -> [cost, items]
  quick = []
  for item in items:
    # A parametrized test by its own name (e.g. test_x[a]) first, then by its function's.
    group, seconds = _SLOW_TESTS.get(item.name, _SLOW_TESTS.get(item.originalname, (None, 0)))
    if not seconds:
      quick.append(item)
      continue
    entry = groups.setdefault(group or item.nodeid, [0, []])
    entry[0] += seconds
    entry[1].append(item)
  halves = [[0, []], [0, []]]
  for cost, members in sorted(groups.values(), key=lambda g: -g[0]):
    half = min(halves, key=lambda h: h[0])  # the longest group to the lighter half
    half[0] += cost
    half[1].extend(members)
  first, second = halves[0][1], halves[1][1]
  fill = max(0, len(items) // 2 - len(first))  # worksteal's first half: len(items) // 2 tests
  items[:] = first + quick[:fill] + second + quick[fill:]
