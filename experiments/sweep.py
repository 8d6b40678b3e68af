r"""Runs a grid of methods x seeds of one config into one folder, skipping finished runs.

  python experiments/sweep.py --config configs/mnist_lenet300.py --out runs/mnist \
      --methods imp,swamp --seeds 0,1 \
      -- --config.dataset.data_dir=../shared/data/tensorflow_datasets

Each run goes to OUT/METHOD/seedS (its own workdir: results.jsonl, plot, model).
A run whose workdir already holds a finished run is skipped and an interrupted
one resumes from its newest checkpoint, so an interrupted sweep is continued,
losing nothing, by running the same command again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# Each baseline is the same code under a few config overrides (../shared/SWAMP.md).
METHODS = {
  "imp": ["--config.num_particles=1", "--config.swa.enabled=False"],
  "imp_swa": ["--config.num_particles=1", "--config.swa.enabled=True"],
  "swamp_noswa": ["--config.swa.enabled=False"],
  "swamp": ["--config.swa.enabled=True"],
  # SWAMP+: one particle while the network is still dense-ish (the paper's cheaper variant).
  "swamp_plus": ["--config.swa.enabled=True", "--config.single_particle_rounds=5"],
}


def train_unless_finished(config: str, workdir: str, seed: int, flags: list[str]) -> None:
  """Runs ``python -m swamp_jax`` on ``workdir`` unless it holds a finished run.

  An interrupted run (checkpoints, no final model) is resumed where its newest
  checkpoint left it, never retrained: the run itself resumes a workdir it
  finds unfinished, so the sweep must not pass ``overwrite``.
  """
  if os.path.isdir(os.path.join(workdir, "final_model")):
    print(f"skip {workdir}: finished", flush=True)
    return
  cmd = [
    sys.executable,
    "-m",
    "swamp_jax",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.seed={seed}",
    "--config.progress=False",
    *flags,
  ]
  resuming = os.path.isdir(os.path.join(workdir, "checkpoints"))
  print("resume" if resuming else "run", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--methods", default="imp,swamp")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("overrides", nargs="*", help="extra --config.field=value flags")
  args = parser.parse_args()
  for method in args.methods.split(","):
    if method not in METHODS:
      sys.exit(f"unknown method {method!r}; known: {', '.join(METHODS)}")
  for seed in args.seeds.split(","):
    for method in args.methods.split(","):
      workdir = os.path.join(args.out, method, f"seed{seed}")
      train_unless_finished(args.config, workdir, seed, [*METHODS[method], *args.overrides])


if __name__ == "__main__":
  main()
