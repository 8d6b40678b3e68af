r"""Runs the paper's analyses on a sweep folder and writes their tables and plots.

  python experiments/analyze.py --out runs/grid/lenet300 --seeds 0,1,2

Reads the runs that experiments/sweep.py wrote (OUT/METHOD/seedS) and, for
each seed, computes (../shared/SWAMP.md, claims 3-5):

- ``particle_lmc``: loss and accuracy barriers on the line between particles
  0 and 1 of each round (methods with several particles);
- ``round_lmc``: the same between the averaged solutions of rounds r and r+1
  (under round r's mask; the row's sparsity is round r's);
- ``hessian``: Hutchinson's estimate of the training-loss Hessian trace of
  each round's averaged model (fixed training batches and probes);
- ``mask_quality``: one IMP round retrained on SWAMP's round-r mask from the
  IMP run's own ticket and data order, against that IMP run's round r;
- ``lottery_pools``: the Lottery Pool of round r (one more baseline): round r's
  solution mixed greedily, on the validation split, with the nearest
  ``--pool_candidates`` rounds' solutions under round r's mask.

Rows go to OUT/analyses/KIND.jsonl, one per (method, seed, round), and rows
already there are skipped, so an interrupted analysis continues where it
stopped. Then OUT/analyses.md gets a table per quantity (mean ± sample std
over seeds, per sparsity) and OUT/analyses_KIND.png a plot of each.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple

from report import _sparsity_key, find_runs, format_markdown, plot_accuracies

from swamp_jax import results, saved_runs
from swamp_jax.analyses import connectivity, flatness, lottery_pools, mask_quality

ANALYSES = ("particle_lmc", "round_lmc", "hessian", "mask_quality", "lottery_pools")
ANALYSIS_DIR = "analyses"
REPORT_FILE = "analyses.md"


def parse_rounds(text: str, num_rounds: int) -> list[int]:
  """'all', 'a,b,c' or 'start:stop:step' (Python slice of 0..num_rounds-1)."""
  if text == "all":
    return list(range(num_rounds))
  if ":" in text:
    return list(range(num_rounds))[slice(*[int(t) if t else None for t in text.split(":")])]
  rounds = [int(t) for t in text.split(",")]
  bad = [r for r in rounds if not 0 <= r < num_rounds]
  if bad:
    raise ValueError(f"rounds {bad} are outside the runs' 0..{num_rounds - 1}")
  return rounds


def _read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def compute_row(kind: str, workdir: str, imp_workdir: str | None, r: int, args) -> dict:
  """The analysis ``kind`` of round ``r`` of the run in ``workdir``."""
  if kind == "particle_lmc":
    out = connectivity.compute_particle_connectivity(workdir, r, (0, 1))
  elif kind == "round_lmc":
    out = connectivity.compute_round_connectivity(workdir, r)
  elif kind == "hessian":
    out = flatness.compute_round_hessian_trace(
      workdir, r, num_probes=args.probes, num_batches=args.batches
    )
    return {"trace": out["trace"], "stderr": out["stderr"]}
  elif kind == "mask_quality":
    imp_config = saved_runs.load_config(imp_workdir)
    retrained = mask_quality.retrain_on_saved_mask(imp_config, workdir, r)
    own = {x.round: x for x in results.read_results(imp_workdir)}[r]
    return {
      "on_this_mask": retrained.test_accuracy,
      "on_imp_mask": own.test_accuracy,
      "gain": retrained.test_accuracy - own.test_accuracy,
      "sparsity_check": retrained.sparsity,
    }
  elif kind == "lottery_pools":
    others = [x.round for x in results.read_results(workdir) if x.round != r]
    nearest = sorted(others, key=lambda x: (abs(x - r), x))[: args.pool_candidates]
    out = lottery_pools.compute_lottery_pool_of_run(workdir, r, nearest)
    return {
      "test_accuracy": out["test_accuracy"],
      "ticket_test_accuracy": out["ticket_test_accuracy"],
      "gain": out["test_accuracy"] - out["ticket_test_accuracy"],
      "validation_accuracy": out["validation_accuracy"],
      "ticket_validation_accuracy": out["ticket_validation_accuracy"],
      "weights": {str(k): v for k, v in out["weights"].items()},
    }
  else:
    raise ValueError(f"unknown analysis {kind!r}; known: {', '.join(ANALYSES)}")
  return {"loss_barrier": out["loss_barrier"], "accuracy_barrier": out["accuracy_barrier"]}


def skip_reason(kind: str, workdir: str) -> str | None:
  """Why the run in ``workdir`` cannot give analysis ``kind``, or None."""
  config = saved_runs.load_config(workdir)
  if kind == "particle_lmc" and (config.num_particles < 2 or not config.save_particles):
    return "it has one particle or saved no particle solutions (save_particles=False)"
  if kind == "lottery_pools" and not config.dataset.validation_size:
    return "it holds out no validation split (dataset.validation_size=0)"
  return None


def run_analyses(args) -> None:
  runs = find_runs(args.out)
  os.makedirs(os.path.join(args.out, ANALYSIS_DIR), exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  for kind in args.analyses.split(","):
    path = os.path.join(args.out, ANALYSIS_DIR, f"{kind}.jsonl")
    done = {(x["method"], x["seed"], x["round"]) for x in _read_rows(path)}
    for seed in seeds:
      for method in getattr(args, f"{kind}_methods").split(","):
        workdir = runs.get(method, {}).get(seed)
        imp_workdir = runs.get("imp", {}).get(seed)
        if workdir is None or (kind == "mask_quality" and imp_workdir is None):
          print(f"{kind}: no {method} (or imp) run of seed {seed} in {args.out}; skipped")
          continue
        reason = skip_reason(kind, workdir)
        if reason:
          print(f"{kind}: {method} seed {seed} skipped: {reason}")
          continue
        rounds = results.read_results(workdir)
        last = len(rounds) - (1 if kind == "round_lmc" else 0)
        if kind == "mask_quality":  # rounds both runs have finished
          last = min(last, len(results.read_results(imp_workdir)))
        for r in parse_rounds(getattr(args, f"{kind}_rounds"), last):
          if (method, seed, r) in done:
            continue
          row = {"method": method, "seed": seed, "round": r, "sparsity": rounds[r].sparsity}
          row.update(compute_row(kind, workdir, imp_workdir, r, args))
          print(kind, json.dumps(row), flush=True)
          with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Quantity(NamedTuple):
  kind: str  # the analysis
  field: str  # its row's field
  scale: float  # shown as scale * value
  digits: int
  ylabel: str
  what: str


_PARTICLES, _ROUNDS = (
  "between particles 0 and 1",
  "between rounds r and r+1 (at round r's sparsity)",
)
QUANTITIES = [
  Quantity("particle_lmc", "loss_barrier", 1, 4, "loss barrier", f"test-loss barrier {_PARTICLES}"),
  Quantity(
    "particle_lmc", "accuracy_barrier", 100, 2, "barrier (points)", f"accuracy barrier {_PARTICLES}"
  ),
  Quantity("round_lmc", "loss_barrier", 1, 4, "loss barrier", f"test-loss barrier {_ROUNDS}"),
  Quantity(
    "round_lmc", "accuracy_barrier", 100, 2, "barrier (points)", f"accuracy barrier {_ROUNDS}"
  ),
  Quantity("hessian", "trace", 1, 1, "Hessian trace", "training-loss Hessian trace (Hutchinson)"),
  Quantity(
    "mask_quality", "on_this_mask", 100, 2, "test accuracy (%)", "IMP retrained on each mask (%)"
  ),
  Quantity(
    "mask_quality",
    "gain",
    100,
    2,
    "gain (points)",
    "gain of IMP on this method's mask over IMP on its own (points, paired by seed)",
  ),
  Quantity("lottery_pools", "test_accuracy", 100, 2, "test accuracy (%)", "Lottery Pool (%)"),
  Quantity(
    "lottery_pools",
    "gain",
    100,
    2,
    "gain (points)",
    "Lottery Pool's gain over its round's solution",
  ),
]


def write_summary(out: str) -> str:
  """OUT/analyses.md and one plot per quantity, from OUT/analyses/*.jsonl."""
  sections = [f"# Analyses of {os.path.basename(os.path.abspath(out))}", ""]
  for kind, field, scale, digits, ylabel, what in QUANTITIES:
    rows = _read_rows(os.path.join(out, ANALYSIS_DIR, f"{kind}.jsonl"))
    if not rows:
      continue
    table, seeds = {}, {}
    for x in rows:
      key = _sparsity_key(x["sparsity"])
      table.setdefault(x["method"], {}).setdefault(key, []).append(x[field])
      seeds.setdefault(x["method"], set()).add(x["seed"])
    if kind == "mask_quality" and field == "on_this_mask":
      own = table.setdefault("imp (own mask)", {})
      for x in rows:  # IMP on its own mask, the comparison's other side
        own.setdefault(_sparsity_key(x["sparsity"]), []).append(x["on_imp_mask"])
        seeds.setdefault("imp (own mask)", set()).add(x["seed"])
    counts = {m: len(s) for m, s in seeds.items()}
    plot = f"analyses_{kind}_{field}.png"
    plot_accuracies(table, os.path.join(out, plot), f"{kind}: {field}", scale, ylabel)
    sections += [
      f"## {kind}: {what}",
      "",
      "Mean ± sample std over seeds; n = seeds.",
      "",
      format_markdown(table, counts, scale, digits),
      "",
      f"![{kind} {field}]({plot})",
      "",
    ]
  text = "\n".join(sections)
  with open(os.path.join(out, REPORT_FILE), "w") as f:
    f.write(text)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the sweep folder (OUT/METHOD/seedS)")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--analyses", default=",".join(ANALYSES))
  parser.add_argument("--particle_lmc_methods", default="swamp,swamp_noswa")
  parser.add_argument("--round_lmc_methods", default="imp,swamp")
  parser.add_argument("--hessian_methods", default="imp,imp_swa,swamp")
  parser.add_argument("--mask_quality_methods", default="swamp")
  parser.add_argument("--lottery_pools_methods", default="imp")
  parser.add_argument("--pool_candidates", type=int, default=4, help="nearest rounds pooled")
  for kind in ANALYSES:
    parser.add_argument(f"--{kind}_rounds", default="all", help="'all', 'a,b,c' or 'a:b:c'")
  parser.add_argument("--probes", type=int, default=10, help="Hutchinson probes")
  parser.add_argument("--batches", type=int, default=5, help="training batches for the trace")
  parser.add_argument("--summary_only", action="store_true", help="only rewrite the report")
  args = parser.parse_args()
  if not args.summary_only:
    run_analyses(args)
  print(write_summary(args.out))


if __name__ == "__main__":
  main()
