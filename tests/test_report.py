import importlib.util
import os

import pytest

from swamp_jax import results

from .conftest import REPO
from .saved_runs_for_analyses import get_saved_run


def _load_report_module():
  spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


report = _load_report_module()


def _write_run(workdir, accuracies, prune_fraction=0.2):
  os.makedirs(workdir)
  rounds = []
  for i, acc in enumerate(accuracies):
    remaining = round(1000 * (1 - prune_fraction) ** i)
    rounds.append(
      results.RoundResult(
        i, 1 - remaining / 1000, remaining, 1000, 1, acc, 0.1, (acc,), (0.1,), acc, 0.1
      )
    )
  results.write_results(str(workdir), rounds)


def test_table_gives_mean_and_sample_std_over_seeds_per_sparsity(tmp_path):
  _write_run(tmp_path / "imp" / "seed0", [0.90, 0.80])
  _write_run(tmp_path / "imp" / "seed1", [0.92, 0.84])
  _write_run(tmp_path / "swamp" / "seed0", [0.95, 0.90])
  _write_run(tmp_path / "swamp" / "seed1", [0.93])  # unfinished
  (tmp_path / "imp" / "seed2").mkdir()  # no results yet: ignored
  markdown = report.write_report(str(tmp_path))
  lines = markdown.splitlines()
  assert lines[0] == "| sparsity (%) | imp (n=2) | swamp (n=2) |"
  assert lines[2] == "| 0.00 | 91.00 ± 1.41 | 94.00 ± 1.41 |"
  assert lines[3] == "| 20.00 | 82.00 ± 2.83 | 90.00 (n=1) |"
  text = (tmp_path / report.REPORT_FILE).read_text()
  assert text.count(markdown) == 1
  # swamp - imp per seed: seed0 +5 and +10 points, seed1 +1 (its round 1 is unfinished).
  paired = text.split("paired by seed")[1]
  assert "| 0.00 | 3.00 ± 2.83 |" in paired
  assert "| 20.00 | 10.00 (n=1) |" in paired
  assert (tmp_path / report.PLOT_FILE).stat().st_size > 1000


def test_ensemble_of_a_run_with_itself_reports_that_runs_accuracy(tmp_path, tmp_path_factory):
  imp_dir = get_saved_run("imp", tmp_path_factory)
  for seed in (0, 1):
    (tmp_path / "imp").mkdir(exist_ok=True)
    os.symlink(imp_dir, tmp_path / "imp" / f"seed{seed}")
  report.write_report(str(tmp_path), ensemble=True)
  table = report.collect_accuracies(report.find_runs(str(tmp_path)))
  pairs = report.collect_ensemble_accuracies(report.find_runs(str(tmp_path))["imp"])
  assert sorted(pairs) == sorted(table["imp"])
  for sparsity, values in pairs.items():
    assert values == pytest.approx(table["imp"][sparsity][:1], abs=1e-6)
  text = (tmp_path / report.REPORT_FILE).read_text()
  assert f"{report.ENSEMBLE_METHOD} (n=1)" in text
