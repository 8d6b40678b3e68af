"""The BatchNorm recompute of a streamed run reads its batches through the host, and SWAMP
runs to the end on ImageNet-shaped streamed data (variable-size images)."""

import dataclasses
import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import swamp_jax
from swamp_jax import (
  augmentation,
  batchnorm,
  data,
  imp,
  masking,
  results,
  run_setup,
  streamed_batchnorm,
  streamed_data,
  streamed_evaluation,
  streaming,
  workdir,
)

from . import equivalence
from .test_particles import _setup


class _RecordingSource(streaming.ArraySource):
  """An ``ArraySource`` that records the rows of every read."""

  def __init__(self, images, labels):
    super().__init__(images, labels)
    self.reads = []

  def read_arrays(self, indices):
    self.reads.append(np.asarray(indices))
    return super().read_arrays(indices)


def test_streamed_round_end_reads_the_in_device_rows_and_gives_its_statistics_and_metrics():
  """A trained round of TinyNet (conv, BatchNorm, dense; 96 images of 6x6, batches of 16),
  2 particles with SWA means of 2 snapshots: the average's and each particle's statistics
  are recomputed, in device memory and streamed, from 3 batches of the first 90 rows; the
  test (96) and validation (40) splits are evaluated in device memory and from the host."""
  num_batches, num_examples = 3, 90
  model, params, batch_stats, mask, spec, tx, train = _setup()
  settings = imp.RoundSettings(
    0.2, True, 16, num_batches, 50, swa_snapshots=2, bn_num_examples=num_examples
  )
  assert settings.recomputes_particles()
  spec = dataclasses.replace(spec, swa_start_step=4)
  programs = imp.create_round_programs(model, tx, spec, masking.compute_prunable(params), settings)
  keys = jnp.stack([imp.particle_key(0, 0, n) for n in range(2)])
  states = programs.start(params, batch_stats, mask, keys)
  states, _ = programs.train(states, mask, train, jnp.int32(0), num_steps=8)
  eval_data = imp.EvalData(train.images, train.labels, train.images[:40], train.labels[:40])
  in_device = programs.finish(states, mask, train, eval_data)

  source = _RecordingSource(np.asarray(train.images), np.asarray(train.labels))
  recompute = streamed_batchnorm.create_streamed_recompute(source, "none", model, settings)
  batches = []

  def accumulate(totals, *args):
    batches.append(args[-3].shape)  # the images of one batch: all the pass puts on the device
    return recompute.accumulate(totals, *args)

  recording = dataclasses.replace(recompute, accumulate=accumulate)
  evaluate = streamed_evaluation.create_host_evaluation(model, settings)
  streamed = streamed_batchnorm.with_streamed_recompute(programs, recording, evaluate)
  no_images = train._replace(images=train.images[:0], labels=train.labels[:0])
  host_eval_data = imp.EvalData(*jax.device_get(eval_data))  # numpy: batches of 50 go over
  out = streamed.finish(states, mask, no_images, host_eval_data)

  # The same rows in the same order: a seed-0 permutation of the first num_examples rows.
  order = np.asarray(jax.random.permutation(jax.random.key(0), num_examples))[: 3 * 16]
  np.testing.assert_array_equal(np.concatenate(source.reads), order)
  assert batches == [(16, 6, 6, 1)] * num_batches
  # Two programs (a scan of batches, or a call per batch): each batch's statistics are
  # means of 16 x 6 x 6 conv outputs (sums of 9 terms), added up over the batches.
  rtol = equivalence.training_rtol(num_batches, 16 * 6 * 6, depth=2)
  for name in ("batch_stats", "particle_batch_stats"):
    for a, b in zip(
      jax.tree.leaves(getattr(out, name)), jax.tree.leaves(getattr(in_device, name)), strict=True
    ):
      equivalence.assert_close_normwise(a, b, rtol, name)
  particle_running = jax.tree.leaves(states.batch_stats)
  assert not any(  # they were recomputed, not passed through
    np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(out.particle_batch_stats), particle_running, strict=True)
  )
  for a, b in zip(
    jax.tree.leaves(out.next_mask), jax.tree.leaves(in_device.next_mask), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  metrics, expected = jax.device_get((out.metrics, in_device.metrics))
  assert sorted(metrics) == sorted(expected)
  assert metrics.pop("bn/average_recomputed") and expected["bn/average_recomputed"]
  assert len(metrics) == 2 * (2 + 2 + 2 + 2)  # splits x (average, particles, both BNs) x 2
  # The evaluation also sums in other programs: up to 96 examples' losses through conv,
  # BatchNorm and dense, after the recompute's batches.
  rtol = equivalence.training_rtol(num_batches + 2, 16 * 6 * 6, depth=3)
  images = {"test": train.images, "validation": train.images[:40]}
  models = {  # the headline statistics are the recomputed ones
    "average": (out.params, out.batch_stats),
    "average_recomputed_bn": (out.params, out.batch_stats),
    "average_running_bn": (out.params, out.other_batch_stats),
  }
  for key, value in metrics.items():
    kind, name = key.split("/")
    split, _, metric = name.partition("_")
    if metric == "loss":
      equivalence.assert_close_normwise(value, expected[key], rtol, key)
      continue
    if kind == "particles":
      pairs = [
        jax.tree.map(lambda x, i=i: x[i], (out.particle_params, out.particle_batch_stats))
        for i in range(2)
      ]
      values, wanted = value, expected[key]
    else:
      pairs, values, wanted = [models[kind]], [value], [expected[key]]
    for (params, stats), a, b in zip(pairs, values, wanted, strict=True):
      x = data.preprocess(images[split], train.mean, train.std)
      logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
      equivalence.assert_accuracies_agree(float(a), float(b), logits, rtol)


class _StridedBatchNormNet(nn.Module):
  """224x224 inputs down to 7x7 in two strided convs, with BatchNorm between them."""

  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (8, 8), strides=(8, 8))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Conv(8, (4, 4), strides=(4, 4))(nn.relu(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


_MOCK_EXAMPLES = 12  # every split; batches of 4: 3 steps an epoch


def _mock_getitems(*args, generator, serialized=False):
  """tfds 4.9.10's mock batched read never gets ``self`` (tests/test_datasets.py)."""
  assert not serialized
  return [generator[k] for k in args[-1]]


@pytest.fixture(scope="module")
def imagenet_mock():
  """``imagenet2012`` as ``tfds.testing.mock_data`` (variable-size images, 1,000 classes)."""
  from tensorflow_datasets.testing import mocking

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mocking, "_getitems", _mock_getitems)
    with tfds.testing.mock_data(
      num_examples=_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
      yield


def _imagenet_config():
  swamp_jax.register_model("strided_bn_test", lambda num_classes: _StridedBatchNormNet(num_classes))
  c = swamp_jax.get_default_config()
  c.dataset.name = "imagenet2012"
  c.dataset.test_split = "validation"
  c.dataset.pipeline = "stream"
  c.dataset.cache_dir = ""
  c.model.name = "strided_bn_test"
  c.num_particles = 2
  c.num_rounds = 1  # rounds 0 and 1
  c.rewind_epochs = 0
  c.epochs_per_round = 2
  c.swa.start = 0.0  # two SWA snapshots a round: each particle's statistics recomputed too
  c.batch_size = 4
  c.eval_batch_size = 12
  c.checkpoint.every_steps = 3  # at the first epoch's end: mid-round, one compiled stack size
  c.progress = False
  return c


@pytest.fixture(scope="module")
def imagenet_run(imagenet_mock, tmp_path_factory):
  folder = tmp_path_factory.mktemp("imagenet_stream")
  return swamp_jax.run(_imagenet_config(), str(folder)), folder


def test_swamp_runs_to_the_end_on_streamed_imagenet_with_recomputed_batchnorm(imagenet_run):
  result, folder = imagenet_run
  written = results.read_results(str(folder))
  assert [r.round for r in result.rounds] == [r.round for r in written] == [0, 1]
  assert all(r.bn_statistics == "recomputed" for r in written)
  assert all(r.recomputed_bn_test_accuracy is not None for r in written)
  # Each round's statistics are the in-device recompute's over the training set as
  # evaluation crops it (mock labels and images are the same for every call).
  config = _imagenet_config()
  placement = run_setup.create_placement(config)
  streamed, train, eval_data, _ = streamed_data.load_streamed_data(config, placement)
  assert streamed.transform == "imagenet" and len(streamed.train) == _MOCK_EXAMPLES
  # Nothing of the dataset in device memory: no training images, evaluation sets on the host.
  assert train.images.shape[0] == 0
  assert all(isinstance(x, np.ndarray) for x in eval_data)
  assert eval_data.test_images.shape == (_MOCK_EXAMPLES, 224, 224, 3)
  mean, std = np.asarray(train.mean), np.asarray(train.std)
  images, _ = streamed_data.read_eval_arrays(streamed.train, "imagenet")
  assert images.shape == (_MOCK_EXAMPLES, 224, 224, 3)
  np.testing.assert_array_equal(mean, augmentation.IMAGENET_MEAN)
  model = _StridedBatchNormNet()
  recompute = jax.jit(
    functools.partial(
      batchnorm.recompute_batch_stats, model, mean=mean, std=std, batch_size=4, num_batches=0
    )
  )
  # Per batch: means of 4 x 28 x 28 conv outputs (sums of 8 x 8 x 3 terms); 3 batches.
  rtol = equivalence.training_rtol(3, 4 * 28 * 28, depth=2)
  for r in (0, 1):
    saved = workdir.load_round_model(str(folder), r)
    models = [(saved["params"], saved["batch_stats"])]
    models += [
      jax.tree.map(lambda x, i=i: x[i], (saved["particle_params"], saved["particle_batch_stats"]))
      for i in range(2)
    ]
    for params, stats in models:
      expected = recompute(params, stats, images=images)
      for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected), strict=True):
        equivalence.assert_close_normwise(a, b, rtol)


def test_streamed_imagenet_run_resumed_mid_round_is_bit_identical(imagenet_run):
  result, folder = imagenet_run
  shutil.rmtree(folder / "final_model")  # killed after its last checkpoint, mid-round 1
  resumed = swamp_jax.run(_imagenet_config(), str(folder))
  for a, b in zip(
    jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.mask)),
    jax.tree.leaves((result.params, result.batch_stats, result.mask)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)

  def metrics(rounds):
    return [(r.test_loss, tuple(r.particle_test_loss), r.running_bn_test_accuracy) for r in rounds]

  assert metrics(resumed.rounds) == metrics(result.rounds)
