#!/usr/bin/env bash
# The MNIST LeNet-300-100 comparison published in the README (run from the repo root).
# About 35 minutes per seed for all four methods on 2 CPU cores.
set -euo pipefail
DATA=${TFDS_DATA_DIR:-../shared/data/tensorflow_datasets}
OUT=${1:-runs/mnist_lenet300}
python experiments/sweep.py --config configs/mnist_lenet300.py --out "$OUT" \
  --methods imp,swamp --seeds 0,1 -- --config.dataset.data_dir="$DATA"
python experiments/sweep.py --config configs/mnist_lenet300.py --out "$OUT" \
  --methods imp_swa,swamp_noswa --seeds 0,1 -- --config.dataset.data_dir="$DATA"
python experiments/report.py --out "$OUT" --ensemble
