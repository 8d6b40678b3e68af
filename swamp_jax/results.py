"""Per-round results: the typed objects ``run`` returns, JSON lines, table, plot."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

RESULTS_FILE = "results.jsonl"
PLOT_FILE = "accuracy_vs_sparsity.png"


@dataclasses.dataclass(frozen=True)
class RoundResult:
  """One IMP round: the averaged model trained at ``sparsity``.

  Attributes:
    round: 0 for the dense round, r after r prunes.
    sparsity: fraction of prunable weights that the round's mask removes,
      measured from the mask.
    remaining: surviving prunable weights; ``prunable``: all of them.
    num_particles: particles trained (1 in SWAMP+'s early rounds, for IMP).
    test_accuracy, test_loss: the averaged model, with recomputed BN
      statistics when it averages several weights (several particles, or a
      SWA mean of several snapshots) and running ones when it does not
      (IMP): ``bn_statistics`` says which (None without BatchNorm).
    particle_test_accuracy, particle_test_loss: each particle's solution.
    mean_particle_test_accuracy, mean_particle_test_loss: their means.
    running_bn_test_accuracy, recomputed_bn_test_accuracy: the averaged
      model with the particles' mean running BN statistics, and with
      recomputed ones (one of them is ``test_accuracy``; None without BN or
      with ``bn_recompute.enabled=False``).
    validation_accuracy, particle_validation_accuracy: on the held-out part
      of the training set (None without one).
    seconds: wall time of the round.
  """

  round: int
  sparsity: float
  remaining: int
  prunable: int
  num_particles: int
  test_accuracy: float
  test_loss: float
  particle_test_accuracy: tuple[float, ...]
  particle_test_loss: tuple[float, ...]
  mean_particle_test_accuracy: float
  mean_particle_test_loss: float
  running_bn_test_accuracy: float | None = None
  validation_accuracy: float | None = None
  particle_validation_accuracy: tuple[float, ...] | None = None
  seconds: float = 0.0
  recomputed_bn_test_accuracy: float | None = None
  bn_statistics: str | None = None  # 'recomputed' or 'running': those of test_accuracy

  @classmethod
  def from_metrics(cls, round_index, remaining, prunable, num_particles, metrics, seconds):
    """Builds the result from ``imp.finish_round``'s metrics (host arrays)."""
    m = {k: np.asarray(v) for k, v in metrics.items()}

    def opt(name, as_tuple=False):
      if name not in m:
        return None
      return tuple(float(v) for v in m[name]) if as_tuple else float(m[name])

    return cls(
      round=int(round_index),
      sparsity=1.0 - remaining / prunable,
      remaining=int(remaining),
      prunable=int(prunable),
      num_particles=int(num_particles),
      test_accuracy=float(m["average/test_accuracy"]),
      test_loss=float(m["average/test_loss"]),
      particle_test_accuracy=tuple(float(v) for v in m["particles/test_accuracy"]),
      particle_test_loss=tuple(float(v) for v in m["particles/test_loss"]),
      mean_particle_test_accuracy=float(np.mean(m["particles/test_accuracy"])),
      mean_particle_test_loss=float(np.mean(m["particles/test_loss"])),
      running_bn_test_accuracy=opt("average_running_bn/test_accuracy"),
      validation_accuracy=opt("average/validation_accuracy"),
      particle_validation_accuracy=opt("particles/validation_accuracy", as_tuple=True),
      seconds=float(seconds),
      recomputed_bn_test_accuracy=opt("average_recomputed_bn/test_accuracy"),
      bn_statistics=(
        None
        if "bn/average_recomputed" not in m
        else ("recomputed" if bool(m["bn/average_recomputed"]) else "running")
      ),
    )

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, line: str) -> RoundResult:
    d = json.loads(line)
    for k in ("particle_test_accuracy", "particle_test_loss", "particle_validation_accuracy"):
      if d.get(k) is not None:
        d[k] = tuple(d[k])
    return cls(**d)


@dataclasses.dataclass
class SwampResult:
  """What ``swamp_jax.run`` returns.

  Attributes:
    rounds: one ``RoundResult`` per round, in order.
    params, batch_stats: the averaged model of the last round (host arrays).
    mask: the mask it was trained under (bool pytree like ``params``).
    workdir: where results, plot and checkpoint were written (or None).
  """

  rounds: list[RoundResult]
  params: Any
  batch_stats: Any
  mask: Any
  workdir: str | None = None

  @property
  def final(self) -> RoundResult:
    return self.rounds[-1]

  def table(self) -> str:
    return format_table(self.rounds)


def write_results(workdir: str, rounds: list[RoundResult]) -> None:
  """Writes ``results.jsonl`` (one JSON line per round) atomically.

  The whole file is written from ``rounds`` (the checkpoint holds every
  finished round's result) into a temporary file that replaces the old one,
  so a crash mid-write never leaves a torn line, and a torn or deleted file
  is simply rewritten on resume.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(r.to_json() + "\n" for r in rounds)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_results(workdir: str) -> list[RoundResult]:
  """The rounds listed in ``workdir/results.jsonl`` ([] when there is none).

  Raises:
    ValueError: a line is not a round's JSON (naming the file and line).
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return []
  rounds = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rounds.append(RoundResult.from_json(line))
      except (ValueError, TypeError) as e:
        raise ValueError(
          f"{path}, line {number}, is not a round's result ({e}); a run resumed in "
          f"{workdir!r} rewrites the file from its checkpoint"
        ) from e
  return rounds


def format_table(rounds: list[RoundResult]) -> str:
  """A fixed-width table, one row per round (accuracies in %).

  ``average`` is the headline (``test_accuracy``); ``running-BN`` and
  ``recomp-BN`` are the average with each kind of BatchNorm statistics.
  """
  header = (
    f"{'round':>5} {'sparsity':>9} {'N':>3} {'average':>8} {'particles':>10} "
    f"{'best':>7} {'running-BN':>10} {'recomp-BN':>9}"
  )

  def percent(value, width):
    return f"{'':>{width}}" if value is None else f"{100 * value:>{width}.2f}"

  lines = [header, "-" * len(header)]
  for r in rounds:
    lines.append(
      f"{r.round:>5} {100 * r.sparsity:>8.2f}% {r.num_particles:>3} "
      f"{100 * r.test_accuracy:>8.2f} {100 * r.mean_particle_test_accuracy:>10.2f} "
      f"{100 * max(r.particle_test_accuracy):>7.2f} "
      f"{percent(r.running_bn_test_accuracy, 10)} {percent(r.recomputed_bn_test_accuracy, 9)}"
    )
  return "\n".join(lines)


def plot_curves(
  curves: dict, path: str, title: str = "", ylabel: str = "test accuracy (%)"
) -> None:
  """A quantity (test accuracy in % by default) against sparsity (%), one line per label.

  Args:
    curves: label -> (sparsities in %, values, errors or None).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, (x, y, err) in curves.items():
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3 if err is not None else 0, label=label)
  ax.set_xlabel("sparsity (%)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_accuracy_vs_sparsity(rounds: list[RoundResult], path: str, title: str = "") -> None:
  """Test accuracy of the average and of the mean particle against sparsity."""
  sparsity = [100 * r.sparsity for r in rounds]
  plot_curves(
    {
      "average (SWAMP)": (sparsity, [100 * r.test_accuracy for r in rounds], None),
      "mean of particles": (sparsity, [100 * r.mean_particle_test_accuracy for r in rounds], None),
    },
    path,
    title,
  )
