"""Properties of the models and of the two conv lowerings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models import MODEL_NAMES, count_params, create_model

from . import equivalence

CIFAR = (2, 32, 32, 3)
# One small input shape for every eager resnet test, so compiled primitives are shared.
SMALL = (2, 8, 8, 3)


def _shapes(model, shape):
  """The model's variables as `jax.ShapeDtypeStruct`s, without running an init."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  kwargs = {} if isinstance(model, Conv) else {"train": False}
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)


def _random_variables(model, shape, seed=0):
  """Random variables for `model`, drawn with NumPy (an eager `model.init` compiles one random
  op per leaf shape, which dominates the test time). Unlike a fresh init, biases, BN scales and
  running stats are not constants, so a test cannot pass by ignoring them."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _shapes(model, shape))


# Two lowerings of one model reduce in different orders (tests/equivalence.py). One conv:
# sums of at most 5x5x3 terms. ResNet-20 on SMALL: 21 convs, 21 BatchNorms and a dense layer
# in sequence, sums of at most 3x3x64 terms (a conv's fan-in) or 2x8x8 (batch statistics).
CONV_RTOL = equivalence.sum_rtol(5 * 5 * 3)
RESNET20_RTOL = equivalence.training_rtol(1, 3 * 3 * 64, depth=43)


def _assert_trees_close(actual, expected, rtol):
  equivalence.assert_trees_close_normwise(actual, expected, rtol)


@pytest.mark.parametrize(
  "name, shape, expected",
  [
    ("lenet300_100", (1, 28, 28, 1), 266_610),
    ("resnet20", CIFAR, 272_474),
    ("vgg11", CIFAR, 9_231_114),
    ("vgg13", CIFAR, 9_416_010),
    ("vgg16", CIFAR, 14_728_266),
    ("vgg19", CIFAR, 20_040_522),
    # The PyTorch WRN reference (bias-free convs, 1x1 conv shortcuts) counts.
    ("wrn28_2", CIFAR, 1_467_610),
    ("wrn28_10", CIFAR, 36_479_194),
  ],
)
def test_param_count_matches_reference(name, shape, expected):
  model = create_model(name, 10, conv_impl="xla")
  variables = _shapes(model, shape)
  assert count_params(variables["params"]) == expected
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert logits.shape == (shape[0], 10)


@pytest.mark.parametrize("name", [*MODEL_NAMES, "wrn16_2"])
def test_prunable_weights_are_kernels_and_shapes_follow_num_classes(name):
  shape = (3, 8, 8, 1) if name.startswith("lenet") else (3, 32, 32, 3)
  model = create_model(name, 7, conv_impl="im2col")
  variables = _shapes(model, shape)
  names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
  assert names <= {"kernel", "bias", "scale"}
  assert variables["params"]["head"]["kernel"].shape[-1] == 7
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert logits.shape == (3, 7)


@pytest.mark.parametrize(
  "name, blocks, width", [("wrn28_2", 4, 2), ("wrn16_8", 2, 8), ("wrn32_4", 5, 4)]
)
def test_wrn_blocks_per_stage_and_widths(name, blocks, width):
  params = _shapes(create_model(name, 10, conv_impl="xla"), CIFAR)["params"]
  for stage in (1, 2, 3):
    assert sum(k.startswith(f"stage{stage}_") for k in params) == blocks
  last = params[f"stage3_block{blocks}"]["conv2"]["kernel"]
  assert last.shape == (3, 3, 64 * width, 64 * width)


def test_wrn_depth_without_integer_block_count_raises():
  with pytest.raises(ValueError, match="30"):
    create_model("wrn30_2", 10)


def test_unknown_model_raises_with_name_and_valid_names():
  with pytest.raises(ValueError, match="nope") as info:
    create_model("nope", 10)
  assert "resnet20" in str(info.value) and "wrn" in str(info.value)


def test_resolve_conv_impl():
  assert resolve_conv_impl("xla") == "xla"
  assert resolve_conv_impl("im2col") == "im2col"
  assert resolve_conv_impl("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="bad"):
    resolve_conv_impl("bad")
  with pytest.raises(ValueError, match="bad"):
    Conv(4, 3, impl="bad").init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))


@pytest.mark.parametrize(
  "kernel_size, strides, padding, hw",
  [
    (3, 1, "SAME", (9, 9)),
    (3, 2, "SAME", (9, 7)),
    (3, 2, "SAME", (8, 8)),
    (5, 1, "SAME", (7, 8)),
    (5, 2, "VALID", (11, 12)),
    (1, 2, "SAME", (7, 9)),
    (1, 1, "SAME", (6, 6)),
    (3, 1, 1, (5, 6)),
    ((2, 3), (2, 1), ((1, 0), (2, 1)), (7, 6)),
  ],
)
def test_im2col_conv_equals_xla_conv(kernel_size, strides, padding, hw):
  shape = (2, *hw, 3)
  conv = lambda impl: Conv(5, kernel_size, strides, padding, impl=impl)
  variables = _random_variables(conv("xla"), shape)
  assert jax.tree.structure(variables) == jax.tree.structure(_shapes(conv("im2col"), shape))
  x = jax.random.normal(jax.random.key(1), shape)
  _assert_trees_close(
    conv("im2col").apply(variables, x), conv("xla").apply(variables, x), CONV_RTOL
  )


def _train_step(model):
  return lambda variables, x: model.apply(variables, x, train=True, mutable=["batch_stats"])


# Eager applies: compiling resnet20 once per case would dominate this file's run time.
@pytest.mark.parametrize("name, shape", [("resnet20", SMALL), ("lenet5", (4, 8, 8, 1))])
def test_model_logits_do_not_depend_on_conv_impl(name, shape):
  xla, im2col = (create_model(name, 10, conv_impl=impl) for impl in ("xla", "im2col"))
  variables = _random_variables(xla, shape)
  assert jax.tree.structure(variables) == jax.tree.structure(_shapes(im2col, shape))
  x = jax.random.normal(jax.random.key(2), shape)
  rtol = RESNET20_RTOL  # LeNet-5 (4 layers after a 5x5 conv) reduces less
  _assert_trees_close(
    im2col.apply(variables, x, train=False), xla.apply(variables, x, train=False), rtol
  )
  _assert_trees_close(_train_step(im2col)(variables, x), _train_step(xla)(variables, x), rtol)


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
def test_vmap_over_particles_equals_loop(conv_impl):
  model = create_model("resnet20", 10, conv_impl=conv_impl)
  shape, num_particles = SMALL, 3
  particles = [_random_variables(model, shape, seed=p) for p in range(num_particles)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *particles)
  xs = jax.random.normal(jax.random.key(3), (num_particles, *shape))
  # Jitted (as SWAMP runs them): eager, every op of the vmapped step compiled on its own took
  # 9.9 s with 'xla', against 1.7 s for both programs.
  lifted = jax.jit(jax.vmap(_train_step(model)))(stacked, xs)
  step = jax.jit(_train_step(model))
  for p in range(num_particles):
    expected = step(particles[p], xs[p])
    _assert_trees_close(jax.tree.map(lambda leaf, p=p: leaf[p], lifted), expected, RESNET20_RTOL)


def test_bn_momentum_zero_gives_the_batch_statistics():
  model = create_model("resnet20", 10, conv_impl="xla", bn_momentum=0.0)
  variables = _random_variables(model, SMALL)
  x = jax.random.normal(jax.random.key(5), SMALL)
  _, updates = _train_step(model)(variables, x)
  stem = Conv(16, 3, use_bias=False).apply({"params": variables["params"]["stem_conv"]}, x)
  stats = updates["batch_stats"]["stem_bn"]
  # numpy's two-pass statistics of the conv output (3x3x3 fan-in) vs BatchNorm's one pass
  # over 2x8x8 positions: two reductions in sequence.
  expected = {"mean": stem.mean(axis=(0, 1, 2)), "var": stem.var(axis=(0, 1, 2))}
  _assert_trees_close(stats, expected, equivalence.training_rtol(1, 2 * 8 * 8, depth=2))


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2", "vgg11"])
def test_every_batch_norm_honours_momentum(name):
  """new = m * old + (1 - m) * batch statistic in every BN layer, with the batch statistic
  taken from the same model built with momentum 0."""
  shape = SMALL
  x = jax.random.normal(jax.random.key(6), shape)
  fresh = create_model(name, 10, conv_impl="im2col", bn_momentum=0.0)
  variables = _random_variables(fresh, shape)
  _, batch = _train_step(fresh)(variables, x)
  slow = create_model(name, 10, conv_impl="im2col", bn_momentum=0.75)
  _, updated = _train_step(slow)(variables, x)
  old = variables["batch_stats"]
  expected = jax.tree.map(lambda o, b: 0.75 * o + 0.25 * b, old, batch["batch_stats"])
  # Two compiled programs: each layer's statistics pass through every layer before it
  # (at most 43 reductions in sequence, of up to 3x3x512 terms in VGG-11).
  _assert_trees_close(updated["batch_stats"], expected, equivalence.training_rtol(1, 4608, 43))


IMAGENET = (1, 224, 224, 3)


def test_resnet50_matches_torchvision_count_and_v1_5_layout():
  """torchvision's resnet50(): 25,557,032 params for 1,000 classes; the stride of a
  downsampling block sits in its 3x3 conv (v1.5), 224x224 input ends in 7x7x2048."""
  model = create_model("resnet50", 1000, conv_impl="xla")
  variables = _shapes(model, IMAGENET)
  params = variables["params"]
  assert count_params(params) == 25_557_032
  for stage, blocks in enumerate((3, 4, 6, 3), start=1):
    assert sum(k.startswith(f"stage{stage}_") for k in params) == blocks
  assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert params["head"]["kernel"].shape == (2048, 1000)
  assert (
    "shortcut_conv" in params["stage1_block1"] and "shortcut_conv" not in params["stage1_block2"]
  )
  _, state = jax.eval_shape(
    lambda v: model.apply(
      v, jnp.zeros(IMAGENET), train=False, capture_intermediates=True, mutable=["intermediates"]
    ),
    variables,
  )
  block = state["intermediates"]["stage2_block1"]
  assert block["conv1"]["__call__"][0].shape == (1, 56, 56, 128)  # 1x1 conv keeps 56x56
  assert block["conv2"]["__call__"][0].shape == (1, 28, 28, 128)  # the 3x3 conv strides
  last = state["intermediates"]["stage4_block3"]["__call__"][0]
  assert last.shape == (1, 7, 7, 2048)
