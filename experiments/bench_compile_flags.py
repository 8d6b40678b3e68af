"""Measures the XLA:CPU settings tests/conftest.py adds for the test suite: compile time and
CPU time of three tiny runs, each settings in a fresh process with no compilation cache.

  PYTHONPATH=. python experiments/bench_compile_flags.py [--repeats 2]

The runs are the suite's kind: digits, 2 particles, the dense epoch and one round of one
epoch, for LeNet-5, LeNet-300-100 and ResNet-20 (batch 32), without a workdir. Each
settings' process reports its CPU time (user + sys, all threads) and the backend compile
time (``jax.monitoring``'s ``/jax/core/compile/backend_compile_duration``). Printed per
settings: the medians over ``--repeats`` and their ratio to JAX's defaults. All settings
run with JAX_DISABLE_MOST_OPTIMIZATIONS=1, as the suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = {
  "defaults": [],
  "loop emitters": ["--xla_cpu_use_fusion_emitters=false"],
  "loop emitters, one LLVM module (the suite's)": [
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
  ],
}


def _worker():
  import collections
  import resource

  import jax

  events = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: events.__setitem__(event, events[event] + seconds)
  )
  # XLA reads XLA_FLAGS when the backend starts: start it before tests.conftest (imported for
  # its tiny config) appends the suite's flags to the environment.
  jax.devices()
  sys.path.insert(0, REPO)
  import swamp_jax
  from tests.conftest import create_tiny_config

  for model in ("lenet5", "lenet300_100", "resnet20"):
    config = create_tiny_config(model__name=model, num_rounds=1, epochs_per_round=1)
    if model == "resnet20":
      config.batch_size = 32
    swamp_jax.run(config)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  compile_s = events["/jax/core/compile/backend_compile_duration"]
  print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime, "compile": compile_s}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--worker", action="store_true")
  args = parser.parse_args()
  if args.worker:
    return _worker()
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=REPO)
  measured = {name: [] for name in SETTINGS}
  for _ in range(args.repeats):  # interleaved, so that the machine's drift hits all alike
    for name, flags in SETTINGS.items():
      out = subprocess.run(
        [sys.executable, __file__, "--worker"],
        env={**env, "XLA_FLAGS": " ".join(flags)},
        capture_output=True,
        text=True,
        check=True,
      )
      measured[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = {k: np.median([m[k] for m in measured["defaults"]]) for k in ("cpu", "compile")}
  print(f"{'settings':46s} {'CPU s':>7s} {'ratio':>6s} {'compile s':>10s} {'ratio':>6s}")
  for name, runs in measured.items():
    cpu = np.median([m["cpu"] for m in runs])
    comp = np.median([m["compile"] for m in runs])
    print(
      f"{name:46s} {cpu:7.1f} {cpu / base['cpu']:6.2f} {comp:10.1f} {comp / base['compile']:6.2f}"
    )


if __name__ == "__main__":
  main()
