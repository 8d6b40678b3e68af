"""ImageNet ResNets of bottleneck blocks (He et al. 2016, v1.5 as torchvision): ResNet-50."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models import registry
from swamp_jax.models.layers import batch_norm as _batch_norm
from swamp_jax.models.layers import he_init as _he_init


class BottleneckBlock(nn.Module):
  """ResNet v1.5 bottleneck (torchvision): [b, h, w, c] -> [b, h/strides, w/strides, 4 * features].

  relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + s(x)): bias-free convs 1x1 (features),
  3x3 (features, carrying the stride: v1.5), 1x1 (4 * features); s = bn(conv1x1 with the
  stride) where the shape changes, the identity otherwise. Every BN scale starts at one (the
  torchvision default, zero_init_residual=False; the ImageNet recipe in SWAMP.md names no
  zero-init).
  """

  features: int
  strides: int = 1
  conv_impl: str = "xla"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(Conv, use_bias=False, kernel_init=_he_init, impl=self.conv_impl)
    bn = functools.partial(_batch_norm, self.bn_momentum, train)
    out = 4 * self.features
    y = nn.relu(bn("bn1")(conv(self.features, 1, name="conv1")(x)))
    # Explicit 1-pixel padding, as torchvision's: 'SAME' pads a stride-2 conv on an even map
    # (0, 1), shifting every sampled window by a pixel against the reference.
    y = conv(self.features, 3, strides=self.strides, padding=1, name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = bn("bn3")(conv(out, 1, name="conv3")(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = bn("shortcut_bn")(conv(out, 1, strides=self.strides, name="shortcut_conv")(x))
    return nn.relu(y + x)


class ImageNetResNet(nn.Module):
  """ImageNet ResNet of `BottleneckBlock`s (torchvision / Flax-examples layout).

  A bias-free 7x7 stride-2 `stem_conv` (64 channels, padding 3), BN-ReLU, a 3x3 stride-2 max-pool
  (padding 1); one stage per entry of `stage_sizes` with 64, 128, 256, 512 bottleneck widths
  (stride 2 at the start of every stage but the first); global average pooling and a dense
  `head`. Input [batch, height, width, channels] (224x224x3 on ImageNet: 7x7x2048 before the
  pool); returns [batch, num_classes]. ResNet-50: stage_sizes (3, 4, 6, 3), 25,557,032 params
  for 1,000 classes.
  """

  num_classes: int
  conv_impl: str = "xla"
  bn_momentum: float = 0.9
  stage_sizes: Sequence[int] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(
      64,
      7,
      strides=2,
      padding=3,
      use_bias=False,
      kernel_init=_he_init,
      impl=self.conv_impl,
      name="stem_conv",
    )(x)
    x = nn.relu(_batch_norm(self.bn_momentum, train, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        x = BottleneckBlock(
          64 * 2**stage,
          strides=2 if stage > 0 and block == 0 else 1,
          conv_impl=self.conv_impl,
          bn_momentum=self.bn_momentum,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def create_resnet50(num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9):
  """ResNet-50: stages of (3, 4, 6, 3) bottleneck blocks."""
  return ImageNetResNet(
    num_classes, resolve_conv_impl(conv_impl), bn_momentum, stage_sizes=(3, 4, 6, 3)
  )


registry.register_model("resnet50", create_resnet50)
