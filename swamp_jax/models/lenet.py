"""LeNet-300-100 (an MLP) and LeNet-5 (a small CNN), the MNIST models of the lottery-ticket work."""

import functools

import flax.linen as nn
import jax

from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models import registry
from swamp_jax.models.layers import max_pool


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
    x = max_pool(nn.relu(conv(6, name="conv1")(x)))
    x = max_pool(nn.relu(conv(16, name="conv2")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def _factory(cls):
  def create(num_classes: int, conv_impl: str = "auto", bn_momentum: float = 0.9) -> nn.Module:
    return cls(num_classes, resolve_conv_impl(conv_impl), bn_momentum)

  return create


registry.register_model("lenet300_100", _factory(LeNet300_100))
registry.register_model("lenet5", _factory(LeNet5))
