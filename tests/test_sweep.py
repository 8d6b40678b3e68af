"""experiments/sweep.py: an interrupted sweep continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time

from .conftest import REPO


def _sweep(out, **popen):
  cmd = [
    sys.executable,
    str(REPO / "experiments" / "sweep.py"),
    "--config=configs/digits.py",
    f"--out={out}",
    "--methods=imp",
    "--seeds=0",
    "--",
    "--config.model.name=lenet300_100",
    "--config.num_rounds=1",
    "--config.epochs_per_round=2",
    "--config.checkpoint.every_steps=11",  # divides the epoch: one program per piece
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)


def test_a_killed_sweep_resumes_its_interrupted_run_and_skips_finished_ones(tmp_path):
  work = tmp_path / "imp" / "seed0"
  results = work / "results.jsonl"
  # Kill once the checkpoint at the start of round 1 is on disk: round 0 is finished and its
  # result is in a checkpoint (digits, batches of 64: 22 steps an epoch; the checkpoint id
  # counts steps trained, 22 dense + 2 epochs of round 0 = 66).
  checkpoints = work / "checkpoints"
  proc = _sweep(tmp_path, start_new_session=True, stdout=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (
      checkpoints.is_dir() and any(p.isdigit() and int(p) >= 66 for p in os.listdir(checkpoints))
    ):
      assert proc.poll() is None, "the sweep ended before round 1 started"
      time.sleep(0.05)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it started
    proc.wait()
  assert not (work / "final_model").exists(), "killed too late: the run had finished"
  round0 = results.read_text().splitlines()[0]

  again = _sweep(tmp_path, stdout=subprocess.PIPE)
  stdout, _ = again.communicate(timeout=300)
  assert again.returncode == 0
  assert stdout.startswith("resume "), stdout
  lines = results.read_text().splitlines()
  # Round 0 was not trained again: its line (wall time included) is the one written before.
  assert lines[0] == round0
  assert [json.loads(line)["round"] for line in lines] == [0, 1]
  assert (work / "final_model").is_dir()

  third = _sweep(tmp_path, stdout=subprocess.PIPE)
  stdout, _ = third.communicate(timeout=120)
  assert third.returncode == 0 and stdout.startswith("skip "), stdout
  assert results.read_text().splitlines() == lines
