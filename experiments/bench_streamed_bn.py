"""Measures the streamed BatchNorm recompute (swamp_jax.streamed_batchnorm) against staging
the training set in device memory, as streamed runs did before it.

  PYTHONPATH=. python experiments/bench_streamed_bn.py --before /tmp/old_tree \
      --out experiments/results/streamed_bn.md

``--before`` is a copy of swamp_jax from before the change (``git archive 8a63e75
swamp_jax | tar -x -C /tmp/old_tree``); each tree runs in a fresh process of its own
(``--worker``). A streamed run of ResNet-20 (BatchNorm) with N=2 particles on a
synthetic CIFAR-shaped training set of 4,000 uint8 images (12.3 MB) is set up, and
one round's ``finish`` runs on the particles at the ticket (an average of 2: its
statistics are recomputed over one epoch, 31 batches of 128). Reported per tree:
the training-set bytes held on each device after set-up, all live device bytes
then, the largest image array the recompute pass puts on the device, the second
``finish`` call's wall time, and the recomputed statistics, compared across trees.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_TRAIN, NUM_TEST = 4_000, 500


def _worker(out_file: str) -> None:
  import jax

  from swamp_jax import config as config_lib
  from swamp_jax import datasets, imp, masking, run_setup

  rng = np.random.default_rng(0)
  dataset = datasets.Dataset.from_arrays(
    (rng.integers(0, 256, (NUM_TRAIN, 32, 32, 3), np.uint8), rng.integers(0, 10, NUM_TRAIN)),
    (rng.integers(0, 256, (NUM_TEST, 32, 32, 3), np.uint8), rng.integers(0, 10, NUM_TEST)),
    num_classes=10,
    name="synthetic",
  )
  c = config_lib.get_default_config()
  c.model.name = "resnet20"
  c.dataset.pipeline = "stream"
  c.num_particles = 2
  c.batch_size = 128
  c.eval_batch_size = 500
  c.progress = False
  put = []
  try:  # the new tree: record every batch the recompute pass puts on the device
    from swamp_jax import streamed_batchnorm

    original = streamed_batchnorm.StreamedRecompute._put

    def recording(self, images):
      put.append(images.nbytes)
      return original(self, images)

    streamed_batchnorm.StreamedRecompute._put = recording
  except ImportError:
    pass
  c = datasets.record_dataset(c, dataset)  # as run(dataset=...) does
  setup = run_setup.create_setup(c, dataset=dataset)
  if hasattr(setup, "programs"):  # RunSetup in parts (after 8a63e75)
    data, initial, rounds = setup.data, setup.initial, setup.programs.rounds
    start = functools.partial(run_setup.start_phase, setup)
  else:  # the code before (8a63e75), for the 'before' column
    data, initial, rounds, start = setup, setup, setup.rounds, setup.start
  train_bytes = int(data.train_data.images.nbytes)
  live_bytes = int(sum(a.nbytes for a in jax.live_arrays()))
  ticket = imp.Ticket(initial.params, initial.batch_stats)
  mask = setup.placement.replicate(masking.create_dense_mask(initial.params))
  states = start(0, ticket, mask)
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    out = rounds.finish(states, mask, data.train_data, data.eval_data)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  stats = {
    jax.tree_util.keystr(p): np.asarray(x).tolist()
    for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(out.batch_stats))
  }
  with open(out_file, "w") as f:
    json.dump(
      {
        "train_bytes": train_bytes,
        "live_bytes": live_bytes,
        "largest_put": max(put, default=0),
        "batches_put": len(put),
        "finish_seconds": times,
        "stats": stats,
      },
      f,
    )


def _run_tree(tree: str) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    env = {**os.environ, "PYTHONPATH": tree}
    subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--worker", f.name], check=True, env=env
    )
    with open(f.name) as g:
      return json.load(g)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--before", help="a copy of swamp_jax from before the change")
  parser.add_argument("--out", default="")
  parser.add_argument("--worker", default="")
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker)
    return
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trees = {"in-device staging (before)": args.before, "streamed (after)": here}
  results = {name: _run_tree(tree) for name, tree in trees.items()}
  before, after = results.values()
  lines = [
    "# Streamed BatchNorm recompute vs the training set staged in device memory",
    "",
    f"ResNet-20, N=2, synthetic {NUM_TRAIN:,} x 32x32x3 uint8 training images "
    f"({NUM_TRAIN * 3072 / 1e6:.1f} MB), pipeline='stream', one CPU device; "
    "`finish` at the ticket, one epoch of recompute (31 batches of 128).",
    "",
    "| | training set on each device | live device bytes after set-up | largest recompute "
    "batch put | batches put (2 calls) | `finish` (2nd call) |",
    "|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    lines.append(
      f"| {name} | {r['train_bytes']:,} B | {r['live_bytes']:,} B | {r['largest_put']:,} B | "
      f"{r['batches_put']} | {r['finish_seconds'][1]:.2f} s |"
    )
  diffs = {
    k: float(np.max(np.abs(np.asarray(after["stats"][k]) - np.asarray(v))))
    for k, v in before["stats"].items()
  }
  identical = all(d == 0.0 for d in diffs.values())
  lines += [
    "",
    "`finish` times are wall clock, each tree in its own process one after the other, on a "
    "machine shared with other jobs: not a fair comparison of speed.",
    "",
    "Recomputed statistics of the average, after vs before: "
    + ("bit-identical" if identical else "largest absolute difference per leaf")
    + ("" if identical else f": {json.dumps(diffs)}"),
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
