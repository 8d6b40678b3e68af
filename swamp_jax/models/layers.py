"""Building blocks shared by the shipped model families."""

import flax.linen as nn
import jax

# He-normal over fan-out, the init of the PyTorch ResNet/WRN/VGG references.
he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(momentum: float, train: bool, name: str | None = None) -> nn.BatchNorm:
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


def max_pool(x: jax.Array) -> jax.Array:
  # 'SAME' keeps a 1x1 map at 1x1, so small inputs (8x8 digits) go through every pool.
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
