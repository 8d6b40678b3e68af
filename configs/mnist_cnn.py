r"""SWAMP on MNIST with the small LeNet-5-like CNN.

python -m swamp_jax --config configs/mnist_cnn.py --workdir runs/mnist_cnn
"""

from swamp_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "mnist"
  config.model.name = "lenet5"
  config.num_particles = 4
  config.num_rounds = 14
  config.rewind_epochs = 1
  config.epochs_per_round = 10
  config.batch_size = 128
  config.optimizer.learning_rate = 0.05
  config.optimizer.weight_decay = 1e-4
  config.swa.learning_rate = 0.01
  config.eval_batch_size = 2000
  return config
