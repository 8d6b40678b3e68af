"""Models: a registry of classifiers by name, the shipped families, and the model contract.

Every model maps float32 input [batch, *input_shape] (NHWC images [batch, height, width,
channels] for the shipped ones) to logits [batch, num_classes] via
`model.apply(variables, x, train=...)` (``lifting``: an nnx.Module is lifted to this form).
`create_model(name, num_classes, **options)` builds any registered model; user models are
added with `register_model(name, factory)` (``registry``). The shipped ones (``lenet``,
``resnet``, ``imagenet_resnet``, ``vgg``) are registered the same way and have the fields
`num_classes`, `conv_impl` (an already resolved 'xla' or 'im2col', see
`swamp_jax.convolution.resolve_conv_impl`) and `bn_momentum`.

Parameter layout, which the rest of the library relies on:
  * prunable weights are params named `kernel` (conv and dense weights; `config.prune_leaves`
    adds other names, e.g. `embedding`), biases `bias`; BatchNorm has `scale`/`bias` params
    and `mean`/`var` in `batch_stats`, and no other collection exists (``contract``);
  * BatchNorm statistics are recomputed for any flax.linen.BatchNorm or nnx.BatchNorm,
    whatever its momentum (``swamp_jax.batchnorm``); the shipped models honour `bn_momentum`;
  * in the shipped models the classifier is the dense layer named `head`, the first conv of a
    ResNet/WRN is `stem_conv`, and the param tree does not depend on `conv_impl`, so weights
    move freely between lowerings.
"""

from swamp_jax.models import contract, imagenet_resnet, lenet, lifting, registry, resnet, vgg
from swamp_jax.models.contract import check_model, check_train_argument, count_params
from swamp_jax.models.imagenet_resnet import BottleneckBlock, ImageNetResNet
from swamp_jax.models.lenet import LeNet5, LeNet300_100
from swamp_jax.models.lifting import NnxModel, as_functional
from swamp_jax.models.registry import (
  create_configured_model,
  create_model,
  get_factory,
  register_model,
  registered_model_names,
)
from swamp_jax.models.resnet import BasicBlock, ResNet, wrn_blocks_per_stage
from swamp_jax.models.vgg import VGG

registry.end_shipped_registrations()
MODEL_NAMES = tuple(registry._FACTORIES)  # the shipped fixed names, before any user registers

__all__ = [
  "MODEL_NAMES",
  "VGG",
  "BasicBlock",
  "BottleneckBlock",
  "ImageNetResNet",
  "LeNet5",
  "LeNet300_100",
  "NnxModel",
  "ResNet",
  "as_functional",
  "check_model",
  "check_train_argument",
  "contract",
  "imagenet_resnet",
  "count_params",
  "create_configured_model",
  "create_model",
  "get_factory",
  "lenet",
  "lifting",
  "register_model",
  "registered_model_names",
  "registry",
  "resnet",
  "vgg",
  "wrn_blocks_per_stage",
]
