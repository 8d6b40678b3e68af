r"""SWAMP on CIFAR-100 with VGG-16 (BN) at paper scale.

Epochs per round and the rewind point are our defaults (the paper's code is not
public); SWA runs at a constant lr 0.05 from 75% of each round, as in the paper.

Paper-scale: needs a GPU or TPU (hours per run there; days on a CPU). Data
comes through TFDS (downloaded and prepared on first use). Launch:

  python -m swamp_jax --config configs/cifar100_vgg16.py --workdir gs://bucket/cifar100_vgg16
  # more particles or sparsity:   --config.num_particles=8 --config.num_rounds=18
  # IMP baseline:                 --config.num_particles=1 --config.swa.enabled=False
"""

from swamp_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "cifar100"
  config.model.name = "vgg16"
  config.model.conv_impl = "auto"  # XLA conv on GPU/TPU
  config.num_particles = 4
  config.num_rounds = 13  # 1 - 0.8^13 = 94.5% sparsity
  config.rewind_epochs = 5
  config.epochs_per_round = 200
  config.batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.swa.learning_rate = 0.05
  config.swa.start = 0.75
  config.eval_batch_size = 1000
  return config
