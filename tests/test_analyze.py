"""experiments/analyze.py on the tiny saved runs: rows, resumption and the summary."""

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest

from .conftest import REPO
from .saved_runs_for_analyses import get_saved_run


def _load_analyze_module():
  sys.path.insert(0, str(REPO / "experiments"))  # analyze imports its sibling report.py
  spec = importlib.util.spec_from_file_location("analyze", REPO / "experiments" / "analyze.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


analyze = _load_analyze_module()


def _args(out, **overrides):
  args = dict(
    out=str(out),
    seeds="0",
    analyses=",".join(analyze.ANALYSES),
    particle_lmc_methods="swamp",
    round_lmc_methods="swamp",
    hessian_methods="imp,swamp",
    mask_quality_methods="imp,swamp",
    lottery_pools_methods="imp",
    lottery_pools_rounds="1",
    pool_candidates=2,
    particle_lmc_rounds="1",
    round_lmc_rounds="0",
    hessian_rounds="1",
    mask_quality_rounds="1",
    probes=2,
    batches=1,
  )
  args.update(overrides)
  return SimpleNamespace(**args)


def test_analyses_of_a_sweep_folder(tmp_path, tmp_path_factory):
  for method in ("imp", "swamp"):
    (tmp_path / method).mkdir()
    os.symlink(get_saved_run(method, tmp_path_factory), tmp_path / method / "seed0")
  analyze.run_analyses(_args(tmp_path))

  def rows(kind):
    lines = (tmp_path / analyze.ANALYSIS_DIR / f"{kind}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]

  quality = {r["method"]: r for r in rows("mask_quality")}
  # IMP retrained on its own mask from its own ticket and data order is IMP's round again.
  assert quality["imp"]["gain"] == pytest.approx(0.0, abs=1e-6)
  assert quality["swamp"]["sparsity_check"] == pytest.approx(quality["swamp"]["sparsity"])
  (lmc,) = rows("particle_lmc")
  assert lmc["round"] == 1 and lmc["loss_barrier"] >= 0.0
  assert {r["method"] for r in rows("hessian")} == {"imp", "swamp"}
  assert all(r["trace"] > 0 for r in rows("hessian"))
  assert [r["round"] for r in rows("round_lmc")] == [0]
  (pool,) = rows("lottery_pools")
  # The greedy search starts from the round's own solution and keeps only improvements.
  assert sum(pool["weights"].values()) == pytest.approx(1.0)
  assert set(pool["weights"]) <= {"0", "1", "2"}
  assert pool["validation_accuracy"] >= pool["ticket_validation_accuracy"]

  # A second call computes nothing new: every row is already there.
  before = {k: rows(k) for k in analyze.ANALYSES}
  analyze.run_analyses(_args(tmp_path))
  assert {k: rows(k) for k in analyze.ANALYSES} == before

  text = analyze.write_summary(str(tmp_path))
  assert "imp (own mask) (n=1)" in text
  assert (tmp_path / "analyses_hessian_trace.png").stat().st_size > 1000


def test_rounds_outside_the_runs_are_refused():
  assert analyze.parse_rounds("all", 3) == [0, 1, 2]
  assert analyze.parse_rounds("1:", 4) == [1, 2, 3]
  with pytest.raises(ValueError, match=r"rounds \[5\] are outside"):
    analyze.parse_rounds("1,5", 3)
