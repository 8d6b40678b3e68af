r"""SWAMP on CIFAR-10 with VGG-13 (BN) at paper scale (``get_paper_config`` says which choices).

Needs a GPU or TPU (hours per run there; days on a CPU). Data comes through
TFDS (downloaded and prepared on first use). Launch:

  python -m swamp_jax --config configs/cifar10_vgg13.py --workdir /data/runs/cifar10_vgg13
  # more particles or sparsity:   --config.num_particles=8 --config.num_rounds=18
  # IMP baseline:                 --config.num_particles=1 --config.swa.enabled=False
"""

from swamp_jax.config import get_paper_config


def get_config():
  return get_paper_config("cifar10", "vgg13")
