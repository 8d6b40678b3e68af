"""The ImageNet ResNet-50 config is the recipe of ../shared/SWAMP.md (checked without data)."""

import importlib.util
import math

import jax
import jax.numpy as jnp

import swamp_jax
from swamp_jax import config as config_lib
from swamp_jax import masking, models, run_setup

from .conftest import REPO


def _load_config():
  """The module and its config."""
  path = REPO / "configs" / "imagenet2012_resnet50.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config()


def test_imagenet_config_prunes_every_conv_kernel_of_resnet50_and_nothing_else():
  _, config = _load_config()
  swamp_jax.validate_config(config)
  model = run_setup.create_config_model(config, 1000)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
  assert models.count_params(params) == 25_557_032
  prunable = masking.compute_prunable(params, config.prune_exclude, config.prune_leaves)
  leaves = jax.tree.leaves(params)
  flags = jax.tree.leaves(prunable)
  assert all(flag == (leaf.ndim == 4) for leaf, flag in zip(leaves, flags, strict=True))
  pruned = sum(math.prod(leaf.shape) for leaf, flag in zip(leaves, flags, strict=True) if flag)
  # All but the head (2048 x 1000 + 1000 = 2,049,000) and the scales and offsets of the 53
  # BatchNorms over 26,560 channels (53,120): 25,557,032 - 2,049,000 - 53,120.
  assert pruned == 23_454_912


def test_imagenet_config_steps_follow_the_recipe():
  module, config = _load_config()
  spe = module.STEPS_PER_EPOCH
  assert spe == 625 and config.batch_size == 2048
  assert config.rewind_epochs * spe == 16_250  # the recipe's 16k, in whole epochs
  assert config.epochs_per_round * spe == 48_125  # the recipe's 48k
  assert config_lib.warmup_steps(config, spe) == 4_800  # 10% of 48k
  assert config.optimizer.learning_rate == 0.8 and config.optimizer.weight_decay == 1e-4
  assert round(0.8**config.num_rounds, 3) == 0.018  # the last reference point


def test_imagenet_config_streams_and_reports_on_the_validation_split():
  _, config = _load_config()
  assert config.dataset.test_split == "validation"  # ImageNet's labelled held-out set
  assert config.dataset.pipeline == "stream"
