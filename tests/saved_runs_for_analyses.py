"""Tiny finished runs (SWAMP and IMP on digits) that the analysis tests share.

Each is trained once per test session, on first use, whichever pytest-xdist
worker asks first (``conftest.compute_once_per_session``); tests only read it.
A pytest fixture imported into several test modules would run once per module.
"""

import swamp_jax
from swamp_jax.analyses import mask_quality

from . import equivalence
from .conftest import compute_once_per_session, create_tiny_config

_WORKDIRS = {}


def create_tiny_swamp_config():
  """SWAMP with 2 particles, 3 rounds of 1 epoch on digits; a validation split for choices."""
  return create_tiny_config(dataset__validation_size=200, epochs_per_round=1)


def get_saved_run(method: str, tmp_path_factory) -> str:
  """The workdir of the tiny 'swamp' or 'imp' run (IMP: the same config made IMP)."""
  if method not in _WORKDIRS:

    def compute(folder):
      config = create_tiny_swamp_config()
      if method == "imp":
        config = mask_quality.create_imp_config(config)
      swamp_jax.run(config, str(folder / "run"))

    folder = compute_once_per_session(tmp_path_factory, f"saved_{method}", compute)
    _WORKDIRS[method] = str(folder / "run")
  return _WORKDIRS[method]


def compute_test_logits(workdir: str, params, batch_stats=None):
  """A saved run's model with ``params`` on its test split: [n, num_classes] logits (for the
  near-tie allowance of tests/equivalence.py)."""
  import numpy as np

  from swamp_jax import data, saved_runs

  run = saved_runs.load_run(workdir)
  x = data.preprocess(run.dataset.test_images, run.dataset.mean, run.dataset.std)
  variables = {"params": params, "batch_stats": batch_stats or {}}
  return np.asarray(run.model.apply(variables, x, train=False))


# LeNet-300-100 evaluated by two programs: 3 layers, sums of at most 300 terms (its fan-in).
LENET300_EVAL_RTOL = equivalence.training_rtol(1, 300, depth=3)
