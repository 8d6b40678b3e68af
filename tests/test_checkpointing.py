"""Preemption safety: SIGKILL and resume, corrupted and incompatible checkpoints, divergence."""

import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import swamp_jax
from swamp_jax import checkpointing, results

from .conftest import REPO

# The killed runs' settings, given on the command line (and to the in-process reference run).
OVERRIDES = {
  "model.name": "lenet300_100",
  "num_particles": 2,
  "num_rounds": 3,
  "epochs_per_round": 2,
  # One checkpoint an epoch (11 steps): every piece trained between checkpoints is then
  # one compiled program of 11 steps, and the kills still land mid-round.
  "checkpoint.every_steps": 11,
  "progress": False,
}
CLI_OVERRIDES = [f"--config.{field}={value}" for field, value in OVERRIDES.items()]


def _cli_config():
  """The config that ``_launch``'s command line gives (configs/digits.py and OVERRIDES)."""
  import runpy

  config = runpy.run_path(str(REPO / "configs" / "digits.py"))["get_config"]()
  for field, value in OVERRIDES.items():
    group, _, name = field.rpartition(".")
    (config[group] if group else config)[name] = value
  return config


def _launch(workdir):
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "swamp_jax",
      "--config",
      "configs/digits.py",
      f"--workdir={workdir}",
      *CLI_OVERRIDES,
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )


def _checkpoint_steps(workdir: pathlib.Path) -> set[int]:
  d = workdir / checkpointing.CHECKPOINT_DIR
  return {int(p.name) for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()


def _assert_same_model(a_dir, b_dir):
  a = swamp_jax.load_final_model(str(a_dir / "final_model"))
  b = swamp_jax.load_final_model(str(b_dir / "final_model"))
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)  # bit-identical


def _round_lines(workdir):
  lines = [json.loads(x) for x in (workdir / results.RESULTS_FILE).read_text().splitlines()]
  return [{k: v for k, v in d.items() if k != "seconds"} for d in lines]


def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result(tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  # The uninterrupted run in this process (the same program as the command line's: the
  # same config on one CPU device), which saves a launch.
  swamp_jax.run(_cli_config(), str(reference))

  # Checkpoint ids count steps trained: 11 dense + 4 rounds x 22 = 99 in all.
  kills = 0
  for progress in (20, 60):  # kill at 22 in round 0 (steps 11-33), then at 66 in round 2 (55-77)
    proc = _launch(resumed)
    deadline = time.time() + 240
    while time.time() < deadline and max(_checkpoint_steps(resumed), default=-1) < progress:
      assert proc.poll() is None, "the run finished before it could be killed"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (resumed / "final_model").exists()
    kills += 1
  proc = _launch(resumed)
  assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
  assert kills == 2
  _assert_same_model(reference, resumed)
  # One line per round, never duplicated or lost, with the same numbers.
  assert [d["round"] for d in _round_lines(resumed)] == [0, 1, 2, 3]
  assert _round_lines(resumed) == _round_lines(reference)


def _run_then_remove_final(config, workdir):
  """A run whose last part is 'lost': keep its checkpoints, drop what came after them."""
  out = swamp_jax.run(config, str(workdir))
  import shutil

  shutil.rmtree(workdir / "final_model")
  return out


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path):
  tiny_config.checkpoint.every_steps = 11  # an epoch: one program per piece
  work = tmp_path / "work"
  reference = _run_then_remove_final(tiny_config, work)  # what the uninterrupted run returned
  steps = sorted(_checkpoint_steps(work))
  assert len(steps) >= 2
  newest = work / checkpointing.CHECKPOINT_DIR / str(steps[-1]) / "state"
  for path in newest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage" * 10)
  resumed = swamp_jax.run(tiny_config, str(work))
  for a, b in zip(
    jax.tree_util.tree_leaves(reference.params),
    jax.tree_util.tree_leaves(resumed.params),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert (work / checkpointing.CHECKPOINT_DIR / str(steps[-2])).is_dir()
  aside = work / (checkpointing.CHECKPOINT_DIR + checkpointing.QUARANTINE_SUFFIX)
  assert [p.name.split("-")[0] for p in aside.iterdir()] == [str(steps[-1])]


def test_checkpoint_of_different_math_is_refused_naming_the_fields(tiny_config, tmp_path):
  _run_then_remove_final(tiny_config, tmp_path)
  before = sorted(_checkpoint_steps(tmp_path))
  tiny_config.num_particles = 3
  tiny_config.model.name = "lenet5"
  with pytest.raises(
    checkpointing.IncompatibleCheckpointError,
    match=r"model.name: 'lenet300_100'.*'lenet5'.*num_particles: 2.*3",
  ):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert sorted(_checkpoint_steps(tmp_path)) == before


def test_changing_fields_that_do_not_change_the_math_is_allowed(tiny_config, tmp_path):
  work = tmp_path / "work"
  reference = _run_then_remove_final(tiny_config, work)
  tiny_config.eval_batch_size = 100
  tiny_config.checkpoint.keep = 5
  resumed = swamp_jax.run(tiny_config, str(work))
  assert resumed.final.round == reference.final.round
  assert len(results.read_results(str(work))) == tiny_config.num_rounds + 1


def test_divergence_stops_with_round_step_and_particle_after_a_good_checkpoint(
  tiny_config, tmp_path
):
  tiny_config.rewind_epochs = 0
  tiny_config.optimizer.learning_rate = 1e8
  tiny_config.swa.learning_rate = 1e8
  with pytest.raises(FloatingPointError, match=r"round 0 at step \d+, particle \d"):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert _checkpoint_steps(tmp_path)  # the last good state is on disk
  assert not (tmp_path / results.RESULTS_FILE).exists()


def test_progress_step_is_monotone_over_the_run():
  ids = [checkpointing.progress_step(-1, s, 10, 40) for s in range(0, 10)]
  for r in range(3):
    ids += [checkpointing.progress_step(r, s, 10, 40) for s in range(10, 40)]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert os.path.basename(checkpointing.CHECKPOINT_DIR) == "checkpoints"


def _flip_bytes_that_still_decode(state_dir: pathlib.Path) -> None:
  """XORs 16 bytes of a data file where orbax still restores, silently, other values.

  Where a flip lands varies (orbax batches writes into files differently run
  to run): one in compressed data or an index fails to decode, which the
  fallback already caught before digests. This looks for the silent kind.
  """
  from swamp_jax import workdir as workdir_lib

  clean = jax.tree_util.tree_leaves(workdir_lib.load_tree(str(state_dir)))
  files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  for path in sorted(files, key=lambda p: -p.stat().st_size):
    original = path.read_bytes()
    for k in range(1, 32):
      at, data = len(original) * k // 32, bytearray(original)
      data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
      path.write_bytes(bytes(data))
      try:
        leaves = jax.tree_util.tree_leaves(workdir_lib.load_tree(str(state_dir)))
      except Exception:  # noqa: BLE001 - a flip orbax notices: try another place
        leaves = clean
      if any(not np.array_equal(a, b) for a, b in zip(leaves, clean, strict=True)):
        return
      path.write_bytes(original)
  raise AssertionError("no flip that still decodes was found")


def test_bit_flip_inside_the_newest_checkpoint_is_caught_by_its_digests(
  tiny_config, tmp_path, caplog
):
  tiny_config.num_rounds = 1
  tiny_config.checkpoint.every_steps = 11  # an epoch: one program per piece
  reference = swamp_jax.run(tiny_config, str(tmp_path / "reference"))
  work = tmp_path / "work"
  _run_then_remove_final(tiny_config, work)
  steps = sorted(_checkpoint_steps(work))
  _flip_bytes_that_still_decode(work / checkpointing.CHECKPOINT_DIR / str(steps[-1]) / "state")
  with caplog.at_level("WARNING"):
    resumed = swamp_jax.run(tiny_config, str(work))
  assert "digest mismatch" in caplog.text
  for a, b in zip(
    jax.tree_util.tree_leaves(reference.params),
    jax.tree_util.tree_leaves(resumed.params),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  aside = work / (checkpointing.CHECKPOINT_DIR + checkpointing.QUARANTINE_SUFFIX)
  assert [p.name.split("-")[0] for p in aside.iterdir()] == [str(steps[-1])]


def _tear_last_line(path: pathlib.Path) -> None:
  with path.open("a") as f:
    f.write('{"round": 1, "sparsity": 0.2, "remaining": 12')  # a crash mid-write


def _cut_to_200_bytes(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage", [_tear_last_line, _cut_to_200_bytes, pathlib.Path.unlink])
def test_torn_or_lost_files_are_rewritten_from_the_checkpoint(
  tiny_config, tmp_path, caplog, damage
):
  tiny_config.num_rounds = 1
  work = tmp_path / "work"
  _run_then_remove_final(tiny_config, work)
  reference = _round_lines(work)
  ticket = swamp_jax.load_final_model(str(work / "ticket"))
  damage(work / results.RESULTS_FILE)
  import shutil

  shutil.rmtree(work / "ticket")
  shutil.rmtree(work / "round_models" / "round_000")
  with caplog.at_level("WARNING"):
    swamp_jax.run(tiny_config, str(work))
  assert _round_lines(work) == reference  # every round once, with the same numbers
  assert "ticket" in caplog.text and "rewriting it" in caplog.text
  for a, b in zip(
    jax.tree_util.tree_leaves(ticket),
    jax.tree_util.tree_leaves(swamp_jax.load_final_model(str(work / "ticket"))),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert "models of finished rounds [0] are missing" in caplog.text
  with pytest.raises(FileNotFoundError, match=r"round 0 is not in .*round_001.*cannot be rebuilt"):
    swamp_jax.load_round_model(str(work), 0)


def test_a_torn_results_file_is_named_with_its_line_when_read(tmp_path):
  (tmp_path / results.RESULTS_FILE).write_text('{"round": 0, "spars')
  with pytest.raises(ValueError, match=r"results.jsonl, line 1, is not a round's result"):
    results.read_results(str(tmp_path))


def test_a_locked_workdir_is_refused_at_once_naming_the_holder(tiny_config, tmp_path):
  from swamp_jax import workdir as workdir_lib

  lock = workdir_lib.lock_workdir(str(tmp_path))  # as a run in another process holds it
  with pytest.raises(workdir_lib.WorkdirInUseError, match=f"in use by process {os.getpid()} "):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lib.LOCK_FILE]
  lock.close()
  workdir_lib.lock_workdir(str(tmp_path)).close()  # free again once the holder is gone


def test_second_launch_is_refused_and_ctrl_c_ends_with_one_line_that_says_how_to_resume(tmp_path):
  work = tmp_path / "work"
  long_run = [
    "--config.epochs_per_round=1000",
    "--config.checkpoint.every_steps=1",
  ]  # saves all along
  first = subprocess.Popen(
    [sys.executable, "-m", "swamp_jax", "--config", "configs/digits.py", f"--workdir={work}"]
    + CLI_OVERRIDES
    + long_run,
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 240
  # Past the dense phase (11 steps), saving at every step.
  while time.time() < deadline and max(_checkpoint_steps(work), default=-1) < 12:
    assert first.poll() is None, first.stderr.read()
    time.sleep(0.05)
  second = subprocess.run(
    [sys.executable, "-m", "swamp_jax", "--config", "configs/digits.py", f"--workdir={work}"]
    + CLI_OVERRIDES
    + long_run,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert second.returncode == 1
  assert second.stderr.strip().splitlines()[-1] == (
    f"swamp_jax: error: workdir {str(work)!r} is in use by process {first.pid} on "
    + (work / ".lock").read_text().split(" on ", 1)[1].strip()
    + "; wait for that run to end (or stop it), or choose another workdir"
  )
  assert first.poll() is None  # the first run goes on
  first.send_signal(signal.SIGINT)
  assert first.wait(timeout=120) == 130
  err = first.stderr.read()
  assert "Traceback" not in err and "failed" not in err.lower(), err[-3000:]
  assert err.strip().splitlines()[-1] == (
    "swamp_jax: error: interrupted; run the same command to resume from the last checkpoint"
  )
  from swamp_jax import workdir as workdir_lib

  workdir_lib.lock_workdir(str(work)).close()  # released


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop
def test_ctrl_c_that_python_drops_in_a_gc_callback_still_stops_the_run(tiny_config, tmp_path):
  # CPython prints a KeyboardInterrupt raised inside a garbage-collector callback (jax
  # registers one) as "Exception ignored" and drops it: CI once saw a run ignore Ctrl-C for
  # 120 s. Here Ctrl-C lands in such a callback once training is underway (a checkpoint
  # is on disk); the run must still stop, by KeyboardInterrupt, long before its end.
  tiny_config.epochs_per_round = 30
  tiny_config.num_rounds = 3
  tiny_config.checkpoint.every_steps = 1000  # one save a round: Ctrl-C lands while training
  work = tmp_path / "work"
  pressed = []

  def press_ctrl_c_in_gc(gc_phase, info):
    if gc_phase == "start" and not pressed and _checkpoint_steps(work):
      pressed.append(time.time())
      signal.raise_signal(signal.SIGINT)  # its handler runs here, inside the callback

  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `python -m`
  gc.callbacks.append(press_ctrl_c_in_gc)
  try:
    with pytest.raises(KeyboardInterrupt):
      swamp_jax.run(tiny_config, str(work))
  finally:
    gc.callbacks.remove(press_ctrl_c_in_gc)
    signal.signal(signal.SIGINT, previous)
  assert pressed, "no garbage collection ran during training"
  assert signal.getsignal(signal.SIGINT) is previous
  assert not (work / "final_model").exists()
  # Stopped in round 0: no checkpoint of round 1's start (ids count steps: 11 an epoch, 1
  # epoch to the rewind point, 30 in round 0), nor any later one.
  assert max(_checkpoint_steps(work)) < 11 * (1 + 30)


def test_a_diverged_run_says_how_to_rerun_it_with_other_settings(tiny_config, tmp_path):
  tiny_config.rewind_epochs = 0
  tiny_config.num_rounds = 0
  tiny_config.epochs_per_round = 1
  tiny_config.optimizer.learning_rate = 1e8
  tiny_config.swa.learning_rate = 1e8
  with pytest.raises(FloatingPointError, match="diverged"):
    swamp_jax.run(tiny_config, str(tmp_path))
  tiny_config.optimizer.learning_rate = 0.05
  tiny_config.swa.learning_rate = 0.01
  with pytest.raises(
    checkpointing.IncompatibleCheckpointError,
    match=r"stopped because it diverged \(training diverged: loss .* round 0.*\).*new workdir, "
    r"or with overwrite=True \(--config.overwrite=True\).*optimizer.learning_rate: 100000000.0",
  ):
    swamp_jax.run(tiny_config, str(tmp_path))
  tiny_config.overwrite = True
  assert swamp_jax.run(tiny_config, str(tmp_path)).final.test_accuracy > 0.5
  assert not (tmp_path / "diverged.txt").exists()


def test_a_fresh_run_from_the_initialization_saves_its_ticket_without_a_warning(
  tiny_config, tmp_path, caplog
):
  # rewind_epochs=0: the run starts at the rewind point, its ticket the initialization.
  tiny_config.rewind_epochs = 0
  tiny_config.num_rounds = 0
  with caplog.at_level("WARNING"):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert (tmp_path / "ticket").is_dir()
  assert "rewriting it" not in caplog.text and "missing" not in caplog.text
