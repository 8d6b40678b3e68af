r"""The embedded default: SWAMP on scikit-learn's digits with LeNet-5, on a CPU.

Needs no download (the 1,797 real 8x8 digits ship inside scikit-learn) and
finishes in a few minutes on 2 CPU cores:

  python -m swamp_jax --config configs/digits.py --workdir /tmp/swamp_digits

Baselines from the same file: --config.num_particles=1 --config.swa.enabled=False (IMP).
"""

from swamp_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "digits"
  config.model.name = "lenet5"
  config.num_particles = 4
  config.num_rounds = 8  # 83.2% sparsity at the end
  config.rewind_epochs = 1
  config.epochs_per_round = 10
  config.batch_size = 64
  config.optimizer.learning_rate = 0.05
  config.swa.learning_rate = 0.01
  config.eval_batch_size = 512
  return config
