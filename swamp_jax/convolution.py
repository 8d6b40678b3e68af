"""A 2-D convolution layer with a choice of lowering: XLA's conv or im2col + one matmul.

Why: on CPU, `jax.vmap` over 4 particles' kernels turns `lax.conv` into a grouped conv costing
about 11x one particle, and `lax.scan` over conv train steps runs about 12x slower than a Python
loop; as im2col + one matmul it vmaps into a batched matmul (about 4.4x) and scans as fast as the
loop. On accelerators XLA's own convolution is the better choice. Both lowerings share one
parameter layout (HWIO `kernel`, optional `bias`), so weights move freely between them.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "im2col")

Padding = str | int | Sequence[int | tuple[int, int]]


def resolve_conv_impl(impl: str) -> str:
  """Returns the conv lowering to use: 'xla' or 'im2col'.

  'auto' picks 'im2col' when JAX's default backend is the CPU and 'xla' otherwise; 'xla' and
  'im2col' are returned unchanged. Anything else raises `ValueError`.
  """
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  if impl not in CONV_IMPLS:
    raise ValueError(
      f"unknown conv impl {impl!r}; valid: 'auto', {', '.join(map(repr, CONV_IMPLS))}"
    )
  return impl


def _as_pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
  return pair


def _explicit_padding(
  padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int]
) -> tuple[tuple[int, int], ...]:
  """Turns 'SAME'/'VALID', an int or per-axis ints/pairs into ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != 2:
    raise ValueError(f"padding needs one entry per spatial axis, got {padding!r}")
  return pads


# Jitted so that an eager call compiles one program per conv shape instead of one per tap slice;
# inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("strides", "pads", "precision"))
def _im2col_conv(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  pads: tuple[tuple[int, int], ...],
  precision=None,
) -> jax.Array:
  """Convolution as one matmul.

  x: [batch, height, width, cin]; kernel: [kh, kw, cin, cout] (HWIO). Returns
  [batch, out_height, out_width, cout], the same as `lax.conv_general_dilated` with NHWC/HWIO.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  n, hp, wp, _ = x.shape
  oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  # Tap (i, j) lands at channels [(i * kw + j) * cin, ...), the row order of an HWIO kernel
  # reshaped to [kh * kw * cin, cout].
  taps = [
    lax.slice(
      x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return jnp.matmul(patches, kernel.reshape(kh * kw * cin, cout), precision=precision)


class Conv(nn.Module):
  """2-D convolution, a drop-in for `flax.linen.Conv` on NHWC input.

  Input [batch, height, width, cin]; output [batch, out_height, out_width, features]. Params:
  `kernel` [kh, kw, cin, features] (HWIO) and, with `use_bias`, `bias` [features].

  Attributes:
    features: output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: 'SAME', 'VALID', an int, or one int or (lo, hi) pair per spatial axis.
    use_bias: whether to add a `bias` param.
    impl: 'xla' (`lax.conv_general_dilated`) or 'im2col' (one matmul); see
      `resolve_conv_impl` for picking one.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  precision: lax.PrecisionLike = None
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in CONV_IMPLS:
      raise ValueError(
        f"unknown conv impl {self.impl!r}; valid: {CONV_IMPLS} "
        "(resolve 'auto' with resolve_conv_impl first)"
      )
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input, got shape {x.shape}")
    kernel_hw = _as_pair(self.kernel_size, "kernel_size")
    strides = _as_pair(self.strides, "strides")
    kernel = self.param(
      "kernel", self.kernel_init, (*kernel_hw, x.shape[-1], self.features), jnp.float32
    )
    pads = _explicit_padding(self.padding, x.shape[1:3], kernel_hw, strides)
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.impl == "xla":
      y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision,
      )
    else:
      y = _im2col_conv(x, kernel, strides, pads, self.precision)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
    return y
