"""Tiny finished runs (SWAMP and IMP on digits) that the analysis tests share.

Each is trained once per test session, on first use, and cached here: a
pytest fixture imported into several test modules would run once per module.
"""

import swamp_jax
from swamp_jax import mask_quality

_WORKDIRS = {}


def create_tiny_swamp_config():
  """SWAMP with 2 particles, 3 rounds of 1 epoch on digits; a validation split for choices."""
  c = swamp_jax.get_default_config()
  c.dataset.name = "digits"
  c.dataset.validation_size = 200
  c.model.name = "lenet300_100"
  c.num_particles = 2
  c.num_rounds = 2
  c.rewind_epochs = 1
  c.epochs_per_round = 1
  c.batch_size = 128
  c.optimizer.learning_rate = 0.05
  c.swa.learning_rate = 0.01
  c.swa.start = 0.5
  c.eval_batch_size = 512
  c.progress = False
  return c


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
