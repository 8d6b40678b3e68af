"""VGG-11/13/16/19 with BatchNorm and a CIFAR head."""

import flax.linen as nn
import jax

from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models import registry
from swamp_jax.models.layers import batch_norm as _batch_norm
from swamp_jax.models.layers import he_init as _he_init
from swamp_jax.models.layers import max_pool as _max_pool

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
_VGG_LAYERS = {
  11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
  19: (
    *(64, 64, "M", 128, 128, "M"),
    *(256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
  ),
}


class VGG(nn.Module):
  """VGG-`depth` with BatchNorm and a CIFAR head.

  Each conv is 3x3 'SAME' with bias, then BN and ReLU (the PyTorch counting: VGG-11/13/16/19
  have 9,231,114 / 9,416,010 / 14,728,266 / 20,040,522 params for 10 classes). After the five
  max-pools a 32x32 input is [batch, 1, 1, 512]; it is flattened into one dense `head`.
  Input [batch, height, width, channels]; returns [batch, num_classes].
  """

  num_classes: int
  conv_impl: str = "xla"
  bn_momentum: float = 0.9
  depth: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    convs = 0
    for layer in _VGG_LAYERS[self.depth]:
      if layer == "M":
        x = _max_pool(x)
        continue
      convs += 1
      x = Conv(layer, 3, kernel_init=_he_init, impl=self.conv_impl, name=f"conv{convs}")(x)
      x = nn.relu(_batch_norm(self.bn_momentum, train, f"bn{convs}")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name="head")(x)


def _vgg_factory(depth: int):
  def create(num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9):
    return VGG(num_classes, resolve_conv_impl(conv_impl), bn_momentum, depth=depth)

  return create


for _depth in _VGG_LAYERS:
  registry.register_model(f"vgg{_depth}", _vgg_factory(_depth))
