r"""Turns a sweep folder into a Markdown table and an accuracy-vs-sparsity plot.

  python experiments/report.py --out runs/mnist [--ensemble]

Reads OUT/METHOD/seedS/results.jsonl (the layout experiments/sweep.py
writes) and writes OUT/report.md and OUT/accuracy_vs_sparsity.png: the test
accuracy of each method's averaged model, mean +- sample std over seeds, per
sparsity. With --ensemble, adds the pseudo-method ``ensemble_imp2``: the
ensemble (mean of softmax outputs) of two IMP runs of different seeds at the
same round, over every pair of IMP seeds whose round models are saved (the
paper's claim 2 compares SWAMP with it). Pairs share runs, so its std is a
spread, not an independent-sample std.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re

import numpy as np

from swamp_jax import results, saved_runs
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import ensembles

ENSEMBLE_METHOD = "ensemble_imp2"
REPORT_FILE = "report.md"
PLOT_FILE = "accuracy_vs_sparsity.png"
_SEED_DIR = re.compile(r"seed(\d+)")

# method -> sparsity in % (2 decimals, the row key) -> one accuracy per seed (or pair)
Accuracies = dict[str, dict[float, list[float]]]


def find_runs(out: str) -> dict[str, dict[int, str]]:
  """method -> seed -> workdir, for every OUT/METHOD/seedS holding results."""
  runs = {}
  for method in sorted(os.listdir(out)):
    if not os.path.isdir(os.path.join(out, method)):
      continue
    for entry in sorted(os.listdir(os.path.join(out, method))):
      match = _SEED_DIR.fullmatch(entry)
      workdir = os.path.join(out, method, entry)
      if match and os.path.exists(os.path.join(workdir, results.RESULTS_FILE)):
        runs.setdefault(method, {})[int(match.group(1))] = workdir
  return runs


def _sparsity_key(sparsity: float) -> float:
  return round(100 * sparsity, 2)


def collect_accuracies(runs: dict[str, dict[int, str]]) -> Accuracies:
  """The averaged model's test accuracy of every round of every run, by method and sparsity."""
  table = {}
  for method, seeds in runs.items():
    rows = table.setdefault(method, {})
    for seed in sorted(seeds):
      for r in results.read_results(seeds[seed]):
        rows.setdefault(_sparsity_key(r.sparsity), []).append(r.test_accuracy)
  return table


def collect_paired_differences(runs: dict[str, dict[int, str]], baseline: str = "imp"):
  """method -> sparsity -> [accuracy - baseline's accuracy] over seeds both have run.

  Runs of one seed share their ticket (the SWA-free IMP schedule trains it), so
  the per-seed difference removes the ticket's share of the seed-to-seed spread.
  """

  def by_seed(workdir):
    return {_sparsity_key(r.sparsity): r.test_accuracy for r in results.read_results(workdir)}

  base = {seed: by_seed(w) for seed, w in runs[baseline].items()}
  table = {}
  for method, seeds in runs.items():
    if method == baseline:
      continue
    rows = table.setdefault(method, {})
    for seed in sorted(set(seeds) & set(base)):
      for sparsity, accuracy in by_seed(seeds[seed]).items():
        if sparsity in base[seed]:
          rows.setdefault(sparsity, []).append(accuracy - base[seed][sparsity])
  return table


def _has_round_model(workdir: str, round_index: int) -> bool:
  return os.path.isdir(workdir_lib.round_model_path(workdir, round_index))


def collect_ensemble_accuracies(seeds: dict[int, str], split: str = "test") -> dict:
  """sparsity -> accuracies of the two-member ensembles of every pair of ``seeds``' runs."""
  if len(seeds) < 2:
    raise ValueError(f"an ensemble of two runs needs two seeds, found {sorted(seeds)}")
  run = saved_runs.load_run(next(iter(seeds.values())))
  per_run = {s: {r.round: r for r in results.read_results(w)} for s, w in seeds.items()}
  rows = {}
  for a, b in itertools.combinations(sorted(seeds), 2):
    for index in sorted(set(per_run[a]) & set(per_run[b])):
      pair = [seeds[a], seeds[b]]
      if not all(_has_round_model(w, index) for w in pair):
        continue
      out = ensembles.evaluate_ensemble_of_runs(pair, index, run.dataset, run.model, split)
      rows.setdefault(_sparsity_key(per_run[a][index].sparsity), []).append(out["accuracy"])
  return rows


def _summary(values: list[float], scale: float = 100.0) -> tuple[float, float]:
  """Mean and sample std (0 for one value) of ``scale * values`` (default: in %)."""
  v = scale * np.asarray(values, dtype=np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def format_markdown(
  table: Accuracies, counts: dict[str, int], scale: float = 100.0, digits: int = 2
) -> str:
  """One row per sparsity, one column per method: 'mean ± std' of ``scale * values``.

  A cell over fewer values than ``counts[method]`` (unfinished runs) says how many;
  one over a single value shows no std.
  """
  methods = list(table)
  sparsities = sorted({s for rows in table.values() for s in rows})
  header = ["sparsity (%)"] + [f"{m} (n={counts[m]})" for m in methods]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s in sparsities:
    cells = [f"{s:.2f}"]
    for m in methods:
      values = table[m].get(s)
      if not values:
        cells.append("")
        continue
      mean, std = _summary(values, scale)
      cell = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
      cells.append(cell + (f" (n={len(values)})" if len(values) < counts[m] else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_accuracies(
  table: Accuracies,
  path: str,
  title: str = "",
  scale: float = 100.0,
  ylabel: str = "test accuracy (%)",
) -> None:
  """``scale * values`` vs sparsity with error bars (sample std over seeds) per method."""
  curves = {}
  for method, rows in table.items():
    if not rows:  # a method without finished rounds yet
      continue
    sparsities = sorted(rows)
    stats = np.asarray([_summary(rows[s], scale) for s in sparsities])
    curves[method] = (sparsities, stats[:, 0], stats[:, 1])
  results.plot_curves(curves, path, title, ylabel)


def write_report(out: str, ensemble: bool = False, ensemble_of: str = "imp") -> str:
  """Writes OUT/report.md and OUT/accuracy_vs_sparsity.png; returns the Markdown table."""
  runs = find_runs(out)
  if not runs:
    raise FileNotFoundError(f"no OUT/METHOD/seedS/{results.RESULTS_FILE} under {out!r}")
  table = collect_accuracies(runs)
  counts = {m: len(seeds) for m, seeds in runs.items()}
  if ensemble:
    if ensemble_of not in runs:
      raise ValueError(f"--ensemble needs {ensemble_of!r} runs in {out!r}; found {list(runs)}")
    seeds = runs[ensemble_of]
    table[ENSEMBLE_METHOD] = collect_ensemble_accuracies(seeds)
    counts[ENSEMBLE_METHOD] = len(seeds) * (len(seeds) - 1) // 2
  markdown = format_markdown(table, counts)
  title = os.path.basename(os.path.abspath(out))
  paired = ""
  if ensemble_of in runs and len(runs) > 1:
    differences = collect_paired_differences(runs, ensemble_of)
    paired = (
      f"\n\n## Difference from {ensemble_of}, paired by seed (points)\n\n"
      f"Per seed, the method's accuracy minus {ensemble_of}'s at the same sparsity "
      "(the same ticket); mean ± sample std over seeds.\n\n"
      + format_markdown(differences, {m: len(runs[m]) for m in differences})
    )
  with open(os.path.join(out, REPORT_FILE), "w") as f:
    f.write(
      f"# {title}\n\nTest accuracy (%) of the averaged model, mean ± sample std over seeds; "
      "n = runs per method"
      + (f" (for {ENSEMBLE_METHOD}: pairs of {ensemble_of} seeds)" if ensemble else "")
      + ".\n\n"
      + markdown
      + f"\n\n![accuracy vs sparsity]({PLOT_FILE})"
      + paired
      + "\n"
    )
  plot_accuracies(table, os.path.join(out, PLOT_FILE), title)
  return markdown


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the sweep folder (OUT/METHOD/seedS)")
  parser.add_argument("--ensemble", action="store_true", help=f"add {ENSEMBLE_METHOD}")
  parser.add_argument("--ensemble-of", default="imp", help="the method whose seeds are paired")
  args = parser.parse_args()
  print(write_report(args.out, args.ensemble, args.ensemble_of))


if __name__ == "__main__":
  main()
