"""Image classifiers used in the SWAMP experiments, as Flax linen modules.

Every model maps NHWC float32 input [batch, height, width, channels] to logits
[batch, num_classes] via `model.apply(variables, x, train=...)`, and has the fields
`num_classes`, `conv_impl` (an already resolved 'xla' or 'im2col', see
`swamp_jax.convolution.resolve_conv_impl`) and `bn_momentum`.

Parameter layout, which the rest of the library relies on:
  * conv and dense weights are params named `kernel` (the prunable weights), their biases
    `bias`; BatchNorm has `scale`/`bias` params and `mean`/`var` in `batch_stats`;
  * every BatchNorm honours `bn_momentum`, so a model built with `bn_momentum=0.0` returns the
    statistics of the batch it was given in train mode (how BN statistics are recomputed after
    averaging particles);
  * the classifier is the dense layer named `head`; the first conv of a ResNet/WRN is `stem_conv`;
  * the param tree does not depend on `conv_impl`, so weights move freely between lowerings.
"""

import functools
import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax

from swamp_jax.convolution import Conv, resolve_conv_impl

# He-normal over fan-out, the init of the PyTorch ResNet/WRN/VGG references.
_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(momentum: float, train: bool, name: str | None = None) -> nn.BatchNorm:
  # Two-pass variance: Flax's default E[x^2] - E[x]^2 cancels catastrophically, which made
  # one SGD step on a ('particle', 'data') mesh differ from one device by ~1e-4 (ResNet-20)
  # instead of ~1e-7; the math must not depend on how the batch is split.
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=momentum,
    epsilon=1e-5,
    use_fast_variance=False,
    name=name,
  )


def _max_pool(x: jax.Array) -> jax.Array:
  # 'SAME' keeps a 1x1 map at 1x1, so small inputs (8x8 digits) go through every pool.
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class LeNet300_100(nn.Module):
  """MLP 784 -> 300 -> 100 -> num_classes with ReLU and biases (266,610 params on MNIST).

  Input [batch, ...] is flattened to [batch, features]; returns [batch, num_classes].
  `conv_impl` and `bn_momentum` are unused (no convs, no BatchNorm).
  """

  num_classes: int
  conv_impl: str = "xla"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(300, name="fc1")(x))
    x = nn.relu(nn.Dense(100, name="fc2")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class LeNet5(nn.Module):
  """LeNet-5-like CNN: conv5x5(6)-relu-maxpool, conv5x5(16)-relu-maxpool, dense 120, 84, head.

  Input [batch, height, width, channels], e.g. 28x28x1 (MNIST, 7x7x16 before the dense
  layers) or 8x8x1 (scikit-learn digits, 2x2x16). Convs and pools use 'SAME' padding, so any
  input size works; the first dense layer's size follows it. Returns [batch, num_classes].
  `bn_momentum` is unused (no BatchNorm).
  """

  num_classes: int
  conv_impl: str = "xla"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(Conv, kernel_size=5, impl=self.conv_impl)
    x = _max_pool(nn.relu(conv(6, name="conv1")(x)))
    x = _max_pool(nn.relu(conv(16, name="conv2")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(self.num_classes, name="head")(x)


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


_FIXED_MODELS = {
  "lenet300_100": LeNet300_100,
  "lenet5": LeNet5,
  "resnet20": functools.partial(ResNet, widths=(16, 32, 64), blocks_per_stage=3),
  **{f"vgg{depth}": functools.partial(VGG, depth=depth) for depth in _VGG_LAYERS},
  "resnet50": lambda **common: ImageNetResNet(stage_sizes=(3, 4, 6, 3), **common),
}
MODEL_NAMES = tuple(_FIXED_MODELS)
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


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


def create_model(
  name: str, num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9
) -> nn.Module:
  """Returns the model called `name`, one of `MODEL_NAMES` or 'wrn{depth}_{width}'.

  `conv_impl` ('auto', 'xla' or 'im2col') is resolved with `resolve_conv_impl`. For
  'wrn{depth}_{width}' the stages have 16 * width, 32 * width and 64 * width channels and
  `wrn_blocks_per_stage(depth)` blocks each. Unknown names raise `ValueError`.
  """
  common = dict(
    num_classes=num_classes, conv_impl=resolve_conv_impl(conv_impl), bn_momentum=bn_momentum
  )
  if name in _FIXED_MODELS:
    return _FIXED_MODELS[name](**common)
  wrn = _WRN_NAME.fullmatch(name)
  if wrn and int(wrn.group(2)) > 0:
    depth, width = int(wrn.group(1)), int(wrn.group(2))
    return ResNet(
      widths=(16 * width, 32 * width, 64 * width),
      blocks_per_stage=wrn_blocks_per_stage(depth),
      preact=True,
      **common,
    )
  raise ValueError(
    f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, "
    "or 'wrn{depth}_{width}' (e.g. 'wrn28_2', 'wrn32_4')"
  )


def count_params(params) -> int:
  """Total number of entries in a pytree of arrays (or `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


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
