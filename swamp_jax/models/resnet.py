"""CIFAR ResNets (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016)."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models import registry
from swamp_jax.models.layers import batch_norm as _batch_norm
from swamp_jax.models.layers import he_init as _he_init


class BasicBlock(nn.Module):
  """Residual block of two bias-free 3x3 convs; [b, h, w, c] -> [b, h/strides, w/strides, features].

  preact=False (CIFAR ResNet, He et al. 2016): relu(bn(conv(relu(bn(conv(x))))) + s(x)), with
  s = bn(conv1x1) where the shape changes ("option B") and the identity otherwise.
  preact=True (Wide ResNet, Zagoruyko & Komodakis 2016): a = relu(bn(x)),
  conv(relu(bn(conv(a)))) + s, with s = conv1x1(a) where the shape changes and x otherwise.
  """

  features: int
  strides: int = 1
  preact: bool = False
  conv_impl: str = "xla"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(
      Conv, self.features, kernel_size=3, use_bias=False, kernel_init=_he_init, impl=self.conv_impl
    )
    bn = functools.partial(_batch_norm, self.bn_momentum, train)
    project = self.strides != 1 or x.shape[-1] != self.features
    if self.preact:
      a = nn.relu(bn("bn1")(x))
      y = conv(strides=self.strides, name="conv1")(a)
      y = conv(name="conv2")(nn.relu(bn("bn2")(y)))
      if project:
        x = conv(kernel_size=1, strides=self.strides, name="shortcut_conv")(a)
      return y + x
    y = nn.relu(bn("bn1")(conv(strides=self.strides, name="conv1")(x)))
    y = bn("bn2")(conv(name="conv2")(y))
    if project:
      x = conv(kernel_size=1, strides=self.strides, name="shortcut_conv")(x)
      x = bn("shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """CIFAR ResNet (preact=False) or Wide ResNet (preact=True) of `BasicBlock`s.

  A bias-free 3x3 stem conv with 16 channels (then BN-ReLU when not preact), then one stage per
  entry of `widths` with `blocks_per_stage` blocks each (stride 2 at the start of every stage
  but the first), then BN-ReLU when preact, global average pooling and a dense `head`.
  Input [batch, height, width, channels]; returns [batch, num_classes].
  ResNet-20: widths (16, 32, 64), 3 blocks per stage, 272,474 params for 10 classes on CIFAR.
  """

  num_classes: int
  conv_impl: str = "xla"
  bn_momentum: float = 0.9
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(16, 3, use_bias=False, kernel_init=_he_init, impl=self.conv_impl, name="stem_conv")(x)
    if not self.preact:
      x = nn.relu(_batch_norm(self.bn_momentum, train, "stem_bn")(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        x = BasicBlock(
          width,
          strides=2 if stage > 0 and block == 0 else 1,
          preact=self.preact,
          conv_impl=self.conv_impl,
          bn_momentum=self.bn_momentum,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    if self.preact:
      x = nn.relu(_batch_norm(self.bn_momentum, train, "final_bn")(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def wrn_blocks_per_stage(depth: int) -> int:
  """Blocks per stage of a Wide ResNet of the given depth.

  n = (depth - 4) / 6 when that is an integer (Zagoruyko & Komodakis: WRN-28-k has 4 blocks,
  WRN-16-k has 2); else n = (depth - 2) / 6 when that is an integer (the ResNet-style count
  that the SWAMP paper's WRN-32-4 needs: 5 blocks); else `ValueError`.
  """
  for overhead in (4, 2):
    if depth > overhead and (depth - overhead) % 6 == 0:
      return (depth - overhead) // 6
  raise ValueError(
    f"WRN depth {depth} fits neither (depth - 4) / 6 nor (depth - 2) / 6 blocks per stage"
  )


def create_resnet20(num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9):
  """ResNet-20: widths (16, 32, 64), 3 blocks per stage."""
  return ResNet(num_classes, resolve_conv_impl(conv_impl), bn_momentum)


def create_wide_resnet(depth: int, width: int):
  """The factory of 'wrn{depth}_{width}': stages of 16, 32 and 64 times ``width`` channels
  with ``wrn_blocks_per_stage(depth)`` blocks each (its ValueError for other depths)."""
  blocks = wrn_blocks_per_stage(depth)

  def create(num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9):
    return ResNet(
      num_classes,
      resolve_conv_impl(conv_impl),
      bn_momentum,
      widths=(16 * width, 32 * width, 64 * width),
      blocks_per_stage=blocks,
      preact=True,
    )

  return create


registry.register_model("resnet20", create_resnet20)
registry.register_model_family(
  r"wrn(\d+)_([1-9]\d*)",
  "'wrn{depth}_{width}' (e.g. 'wrn28_2', 'wrn32_4')",
  lambda match: create_wide_resnet(int(match.group(1)), int(match.group(2))),
)
