r"""SWAMP on MNIST with LeNet-300-100, the classic lottery-ticket setting.

Reads MNIST through TFDS (downloaded on first use; offline, point
--config.dataset.data_dir at a prepared TFDS data directory). About 10
minutes per seed on 2 CPU cores for N=4.

  python -m swamp_jax --config configs/mnist_lenet300.py --workdir runs/mnist_swamp
  # IMP baseline, same config:
  python -m swamp_jax --config configs/mnist_lenet300.py --workdir runs/mnist_imp \
      --config.num_particles=1 --config.swa.enabled=False
"""

from swamp_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "mnist"
  config.model.name = "lenet300_100"
  config.num_particles = 4
  config.num_rounds = 14  # 95.6% sparsity at the end (10 rounds: 89.3%)
  config.rewind_epochs = 1
  config.epochs_per_round = 10
  config.batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 1e-4
  config.swa.learning_rate = 0.01
  config.eval_batch_size = 2000
  return config
