"""Tiny finished runs (SWAMP and IMP on digits) that the analysis tests share.

Each is trained once per test session, on first use, and cached here: a
pytest fixture imported into several test modules would run once per module.
"""

import swamp_jax
from swamp_jax import mask_quality

from .conftest import create_tiny_config

_WORKDIRS = {}


def create_tiny_swamp_config():
  """SWAMP with 2 particles, 3 rounds of 1 epoch on digits; a validation split for choices."""
  return create_tiny_config(dataset__validation_size=200, epochs_per_round=1)


def get_saved_run(method: str, tmp_path_factory) -> str:
  """The workdir of the tiny 'swamp' or 'imp' run (IMP: the same config made IMP)."""
  if method not in _WORKDIRS:
    config = create_tiny_swamp_config()
    if method == "imp":
      config = mask_quality.create_imp_config(config)
    workdir = str(tmp_path_factory.mktemp(f"saved_{method}"))
    swamp_jax.run(config, workdir)
    _WORKDIRS[method] = workdir
  return _WORKDIRS[method]
