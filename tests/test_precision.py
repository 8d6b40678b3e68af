"""Mixed precision: bfloat16 compute, float32 state, and how far bf16 training may drift."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax import (
  batchnorm,
  data,
  datasets,
  evaluation,
  masking,
  models,
  optimizers,
  particles,
  precision,
)

from . import equivalence
from .conftest import create_tiny_config
from .test_particles import TinyNet

# bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of itself
# (round to nearest; the spacing of bf16 numbers in [1, 2) is 2^-7).
BF16_U = 2.0**-8


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_compute_dtype_is_validated_and_float32_is_the_model_itself():
  model = TinyNet()
  assert precision.with_compute_dtype(model, "float32") is model
  wrapped = precision.with_compute_dtype(model, "bfloat16")
  assert wrapped.bn_momentum == 0.9 and wrapped.clone(bn_momentum=0.0).bn_momentum == 0.0
  assert hash(wrapped) == hash(precision.with_compute_dtype(model, "bfloat16"))
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    precision.with_compute_dtype(model, "float16")
  config = create_tiny_config(model__dtype="bfloat16")
  from swamp_jax import run_setup

  assert isinstance(run_setup.create_config_model(config, 10), precision.MixedPrecisionModel)


def test_bf16_model_computes_in_bf16_with_float32_statistics_and_outputs():
  """Products in bf16; BatchNorm statistics (train mode and recomputed after averaging),
  logits, the loss, its gradients, the optimizer state and metrics in float32."""
  model = precision.with_compute_dtype(TinyNet(), "bfloat16")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, size=(32, 6, 6, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 3, size=(32,)), jnp.int32)
  mean, std = jnp.asarray([127.0]), jnp.asarray([70.0])
  x = data.preprocess(images, mean, std)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  assert _float_dtypes(variables) == {jnp.dtype(jnp.float32)}

  def train_apply(v):
    return model.apply(v, x, train=True, mutable=["batch_stats"])

  products = [
    e
    for e in jax.make_jaxpr(train_apply)(variables).jaxpr.eqns
    if e.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  assert len(products) == 2
  for e in products:
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e

  @jax.jit
  def apply_recompute_evaluate(v):
    logits, updated = train_apply(v)
    stats = batchnorm.recompute_batch_stats(
      model, v["params"], v["batch_stats"], images, mean, std, 16, 0
    )
    metrics = evaluation.compute_metrics(model, v, images, labels, mean, std, 16)
    (loss, _), grads = jax.value_and_grad(particles.compute_loss, argnums=1, has_aux=True)(
      model, v["params"], v["batch_stats"], x, labels
    )
    mask = masking.create_dense_mask(v["params"])
    _, opt_state = tx.update(grads, tx.init(v["params"]), v["params"], mask=mask)
    return logits, updated["batch_stats"], stats, metrics, loss, grads, opt_state

  tx = optimizers.masked(optimizers.create_sgd(0.05))  # Nesterov momentum: a float state
  out = apply_recompute_evaluate(variables)
  assert _float_dtypes(out) == {jnp.dtype(jnp.float32)}
  assert _float_dtypes(out[-1]) == {jnp.dtype(jnp.float32)}  # the optimizer state has floats
  logits, updated, recomputed, metrics = out[:4]
  # Statistics reduced in float32 from bf16 activations: most are not bf16 numbers.
  for stats in (updated, recomputed):
    stats = np.concatenate([np.ravel(s) for s in jax.tree.leaves(stats)])
    assert np.mean(stats.astype(jnp.bfloat16).astype(np.float32) != stats) > 0.5
  assert np.isfinite(float(metrics["loss"])) and 0.0 <= float(metrics["accuracy"]) <= 1.0


# How far bf16 training may drift from float32 (the model of tests/equivalence.py, with bf16's
# roundings in place of float32's reordered sums), for LeNet-300-100: L = 3 dense layers. In
# bf16 a value on its way to a kernel's gradient is rounded at most D = 5 L + 2 times: the
# input, and per layer its weights, its product and its bias sum, going forward (3 L + 1); the
# logits' gradient, and per layer the gradients of its input and of its weights, going back
# (2 L + 1). The matmuls accumulate in float32, so their sums add only float32-sized errors.
# To first order each rounding moves a step's update by at most BF16_U of its scale, so an SGD
# step without momentum (the update is the gradient times the learning rate) is off by at most
# D * BF16_U * max|update|, and the weights, carried forward unamplified over a short run at a
# small learning rate (as tests/equivalence.py assumes), by D * BF16_U * the sum over steps of
# max|update|: the float32 run measures that sum, the bound itself is derived.
LAYERS = 3
BF16_ROUNDINGS_PER_STEP = 5 * LAYERS + 2
BF16_FORWARD_ROUNDINGS = 3 * LAYERS + 1
TRACK_STEPS = 11  # one epoch of digits' 1,437 training images in batches of 128
SWA_START = 8  # collects the weights after steps 8, 9 and 10


@functools.cache
def _digits():
  return datasets.Dataset.from_digits()


def _train_round(dtype: str, params, mask):
  """One round: TRACK_STEPS SGD steps (lr 0.1) of LeNet-300-100 on digits from ``params``
  under ``mask``, computing in ``dtype``, SWA over the last steps.

  Returns the final ``ParticleState``, per step the largest |update| of any weight
  (float32 [steps]), and the test logits of the final weights [360, 10].
  """
  ds = _digits()
  model = precision.with_compute_dtype(models.create_model("lenet300_100", 10), dtype)
  train = particles.DeviceData(
    jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels), ds.mean, ds.std
  )
  spec = particles.StepSpec(128, len(ds.train_labels), False, SWA_START, 1)
  tx = optimizers.masked(optimizers.create_sgd(0.1, momentum=0.0, nesterov=False, weight_decay=0))
  state = particles.create_particle(params, {}, mask, jax.random.key(7), tx)
  permutation = data.compute_epoch_permutation(state.key, 0, spec.num_examples)

  def body(state, step):
    new, _ = particles.train_step(
      state, step, permutation, mask, train, model=model, tx=tx, spec=spec
    )
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new.params, state.params)
    return new, jnp.max(jnp.stack(jax.tree.leaves(moved)))

  state, moves = jax.lax.scan(body, state, jnp.arange(TRACK_STEPS, dtype=jnp.int32))
  x_test = data.preprocess(jnp.asarray(ds.test_images), ds.mean, ds.std)
  return state, moves, model.apply({"params": state.params}, x_test, train=False)


def _he_normal_params(model, shape):
  """He-normal kernels and zero biases drawn with NumPy (compiling ``model.init``'s
  initializers costs more than this test's training)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if path[-1].key != "kernel":
      return jnp.zeros(leaf.shape, jnp.float32)
    std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _max_abs_difference(a, b):
  return max(
    float(np.max(np.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
  )


def test_bf16_rounds_track_float32_within_bf16_rounding():
  """Two IMP rounds (dense, then 20% pruned) of LeNet-300-100 on digits in bf16 and in
  float32: the bf16 state stays float32; the weights agree within the bf16 bound, the masks
  but for weights near the pruning threshold, the test accuracies but for examples whose top
  two logits are near-ties. Round 1 starts both from the float32 run's mask, so that a
  near-tie flipped in round 0 does not count twice."""
  ds = _digits()
  params = _he_normal_params(models.create_model("lenet300_100", 10), (1, 8, 8, 1))
  prunable = masking.compute_prunable(params)
  mask = masking.create_dense_mask(params)
  train_round = jax.jit(_train_round, static_argnums=0)
  prune = jax.jit(lambda w, m: masking.compute_mask(w, m, prunable, 0.2))
  for _ in range(2):
    state32, moves, logits32 = train_round("float32", params, mask)
    state16, _, logits16 = train_round("bfloat16", params, mask)
    for name in ("params", "swa"):  # SGD without momentum has no float state (see above)
      assert _float_dtypes(getattr(state16, name)) == {jnp.dtype(jnp.float32)}, name
    assert int(state16.swa.count) == TRACK_STEPS - SWA_START
    w32, w16 = state32.params, state16.params
    scale = equivalence.tree_scale(w32)
    rtol = BF16_ROUNDINGS_PER_STEP * BF16_U * float(np.sum(moves)) / scale
    assert 0 < rtol < 0.1, rtol  # a bound with content
    drift = _max_abs_difference(w16, w32) / scale
    assert drift > 0  # bf16 did compute
    equivalence.assert_trees_close_normwise(w16, w32, rtol)
    mask32, mask16 = prune(w32, mask), prune(w16, mask)
    assert {m.dtype for m in jax.tree.leaves(mask16)} == {jnp.dtype(jnp.bool_)}
    kernels = {k: v for k, v in _flat(w32).items() if k.endswith("['kernel']")}
    equivalence.assert_masks_agree_except_near_the_threshold(
      _flat(mask16), _flat(mask32), kernels, rtol
    )
    # Given weights that differ by `drift` (within the bound, as just checked), logits move
    # with the weights of every layer they pass through and by the forward pass's roundings.
    logit_rtol = LAYERS * drift + BF16_FORWARD_ROUNDINGS * BF16_U
    accuracies = [float(np.mean(np.argmax(x, -1) == ds.test_labels)) for x in (logits16, logits32)]
    equivalence.assert_accuracies_agree(*accuracies, logits32, logit_rtol)
    near_ties = equivalence.count_near_ties(logits32, logit_rtol * float(np.max(np.abs(logits32))))
    assert near_ties < len(ds.test_labels) / 2, near_ties  # an accuracy check with content
    mask = mask32  # IMP: rewind to the initial weights under the new mask
