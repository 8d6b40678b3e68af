r"""Chooses SWA's learning rate and start on the validation split, never on test.

  python experiments/select_swa.py --config configs/mnist_lenet300.py \
      --out runs/grid/lenet300_select --learning_rates 0.01,0.05 --starts 0.5,0.75 \
      -- --config.dataset.validation_size=5000 --config.num_rounds=21 ...

Runs IMP+SWA (one particle, so the choice costs a quarter of a SWAMP run) for
each (learning rate, start) pair on a seed the published grid does not use,
then ranks the pairs by mean validation accuracy over the rounds at or above
``--min_sparsity`` (where the methods differ), and writes the ranking to
OUT/selection.md and the winner to OUT/selection.json. The test accuracy of
these runs is not read. Finished runs are skipped, so an interrupted
selection continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
from sweep import train_unless_finished


def mean_validation_accuracy(results_file: str, min_sparsity: float) -> float:
  with open(results_file) as f:
    rows = [json.loads(line) for line in f]
  accuracies = [r["validation_accuracy"] for r in rows if r["sparsity"] >= min_sparsity]
  if not accuracies or any(a is None for a in accuracies):
    raise ValueError(f"{results_file}: no validation accuracy at sparsity >= {min_sparsity}")
  return float(np.mean(accuracies))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--learning_rates", default="0.01,0.05")
  parser.add_argument("--starts", default="0.5,0.75")
  parser.add_argument("--seed", type=int, default=100)
  parser.add_argument("--min_sparsity", type=float, default=0.9)
  parser.add_argument("overrides", nargs="*", help="extra --config.field=value flags")
  args = parser.parse_args()
  pairs = list(itertools.product(args.learning_rates.split(","), args.starts.split(",")))
  scores = []
  for lr, start in pairs:
    workdir = os.path.join(args.out, f"lr{lr}_start{start}")
    swa_flags = [
      "--config.num_particles=1",
      "--config.swa.enabled=True",
      f"--config.swa.learning_rate={lr}",
      f"--config.swa.start={start}",
    ]
    train_unless_finished(args.config, workdir, args.seed, [*swa_flags, *args.overrides])
    score = mean_validation_accuracy(os.path.join(workdir, "results.jsonl"), args.min_sparsity)
    scores.append((score, lr, start))
  scores.sort(reverse=True)
  lines = [
    f"# SWA choice for {args.config} (IMP+SWA, seed {args.seed}, validation split)",
    "",
    f"Mean validation accuracy over rounds at sparsity >= {args.min_sparsity:.0%}.",
    "",
    "| swa.learning_rate | swa.start | validation accuracy (%) |",
    "|---|---|---|",
    *[f"| {lr} | {start} | {100 * s:.2f} |" for s, lr, start in scores],
    "",
    f"Chosen: `--config.swa.learning_rate={scores[0][1]} --config.swa.start={scores[0][2]}`",
  ]
  with open(os.path.join(args.out, "selection.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "selection.json"), "w") as f:
    json.dump({"learning_rate": float(scores[0][1]), "start": float(scores[0][2])}, f)
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main()
