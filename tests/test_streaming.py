"""The streamed input pipeline: the in-device orders, resume, ImageNet shapes, 'auto'."""

import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import swamp_jax
from swamp_jax import augmentation, checkpointing, data, datasets, results, streamed_data, streaming

from . import equivalence, saved_runs_for_analyses
from .conftest import create_tiny_config

# The shared tiny SWAMP run (saved_runs_for_analyses): LeNet-300-100 on digits less a
# validation split (1,237 training images, batches of 128: 9 steps an epoch), one epoch to
# the rewind point and three rounds (0-2) of one epoch, in device memory. Streamed here.
RUN_STEPS = 9 * 4
# The streamed step is another program than the in-device scan (the same math): its sums may
# run in another order. The largest are over the 300 hidden units and the batch of 128;
# 3 layers, forward and backward.
RUN_RTOL = equivalence.training_rtol(RUN_STEPS, 300, depth=6)


def _streamed_config():
  c = saved_runs_for_analyses.create_tiny_swamp_config()
  c.dataset.pipeline = "stream"
  c.checkpoint.every_steps = 8
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The streamed run in a workdir, and the workdir of the in-device run of its config."""
  workdir = tmp_path_factory.mktemp("streamed")
  streamed = swamp_jax.run(_streamed_config(), str(workdir))
  return streamed, saved_runs_for_analyses.get_saved_run("swamp", tmp_path_factory), workdir


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_streamed_run_agrees_with_the_in_device_run(runs):
  streamed, device_workdir, _ = runs
  device = swamp_jax.load_final_model(os.path.join(device_workdir, "final_model"))
  device_rounds = results.read_results(device_workdir)
  assert [r.round for r in streamed.rounds] == [r.round for r in device_rounds] == [0, 1, 2]
  equivalence.assert_trees_close_normwise(streamed.params, device["params"], RUN_RTOL)
  kernels = {k: v for k, v in _flat(device["params"]).items() if "kernel" in k}
  equivalence.assert_masks_agree_except_near_the_threshold(
    _flat(streamed.mask), _flat(device["mask"]), kernels, RUN_RTOL
  )
  logits = saved_runs_for_analyses.compute_test_logits(device_workdir, device["params"])
  for a, b in zip(streamed.rounds, device_rounds, strict=True):
    equivalence.assert_accuracies_agree(a.test_accuracy, b.test_accuracy, logits, RUN_RTOL)
    assert a.remaining == b.remaining


def test_streamed_run_resumed_mid_epoch_is_bit_identical(runs):
  streamed, _, workdir = runs
  shutil.rmtree(workdir / "final_model")  # the run was killed after its last checkpoint
  newest = max(int(p.name) for p in (workdir / checkpointing.CHECKPOINT_DIR).iterdir())
  # Checkpoint ids count steps (9 to the rewind point, then rounds of 9): the newest is at
  # global step 16 of round 2, the 8th step of its epoch, where the stream resumes.
  assert newest == 9 + 9 + 9 + 7
  resumed = swamp_jax.run(_streamed_config(), str(workdir))
  for a, b in zip(
    jax.tree_util.tree_leaves((resumed.params, resumed.mask)),
    jax.tree_util.tree_leaves((streamed.params, streamed.mask)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert [r.test_accuracy for r in resumed.rounds] == [r.test_accuracy for r in streamed.rounds]


def test_streamed_rows_and_statistics_are_the_in_memory_datasets():
  full = datasets.Dataset.from_digits()  # every training row, in order
  subset = full.hold_out(validation_size=200, train_size=300)
  train_rows, validation_rows = datasets.compute_held_out_rows(
    len(full.train_labels), 200, 300, "d"
  )
  np.testing.assert_array_equal(full.train_images[train_rows], subset.train_images)
  np.testing.assert_array_equal(full.train_images[validation_rows], subset.validation_images)
  source = streaming.RowsSource(
    streaming.ArraySource(full.train_images, full.train_labels), train_rows
  )
  mean, std = streamed_data.compute_source_stats(source, chunk=128)
  np.testing.assert_array_equal(mean, subset.mean)
  np.testing.assert_array_equal(std, subset.std)
  with pytest.raises(ValueError, match=r"train_size must be in \[0, 1237\]"):
    datasets.compute_held_out_rows(len(full.train_labels), 200, 5000, "digits")


def test_host_batches_are_the_in_device_batches_from_any_step_and_block():
  n, batch, spe = 23, 4, 5
  source = streaming.ArraySource(np.arange(n, dtype=np.uint8)[:, None, None, None], np.arange(n))
  keys = np.stack([np.asarray(jax.random.PRNGKey(i), np.uint32) for i in range(3)])
  # From the middle of epoch 0 across the boundary into epoch 1; particles 1-2, rows 1-2.
  got = list(
    streaming.iterate_host_batches(
      source, keys, 3, 8, batch, particle_rows=slice(1, 3), batch_rows=slice(1, 3)
    )
  )
  assert len(got) == 5
  for step, (images, labels) in zip(range(3, 8), got, strict=True):
    assert images.shape == (2, 2, 1, 1, 1) and labels.dtype == np.int32
    for i, p in enumerate((1, 2)):
      perm = data.compute_epoch_permutation(keys[p], step // spe, n)
      idx = np.asarray(data.compute_batch_indices(perm, step % spe, batch))[1:3]
      np.testing.assert_array_equal(labels[i], idx)
      np.testing.assert_array_equal(images[i, :, 0, 0, 0], idx)


class _OneAtATime:
  """A source read one record at a time: tfds.testing.mock_data's batched read
  (``__getitems__``) is broken (it calls its replacement without the keys)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.source[index]


def test_a_worker_process_gives_the_batches_of_the_main_process():
  source = streaming.ArraySource(np.arange(40, dtype=np.uint8)[:, None, None, None], np.arange(40))
  keys = np.stack([np.asarray(jax.random.PRNGKey(i), np.uint32) for i in range(2)])
  inline = list(streaming.iterate_host_batches(source, keys, 2, 7, 8))
  # Copies: a worker's batch lives in shared memory that grain frees with the iterator.
  workers = [
    (np.array(x), np.array(y))
    for x, y in streaming.iterate_host_batches(source, keys, 2, 7, 8, worker_count=1)
  ]
  assert len(workers) == len(inline) == 5
  for (a, b), (c, d) in zip(inline, workers, strict=True):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)


def test_imagenet_like_mock_records_give_224_batches_deterministically():
  keys = np.stack([np.asarray(jax.random.PRNGKey(i), np.uint32) for i in range(2)])
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = _OneAtATime(tfds.data_source("imagenet2012", split="train"))
    sizes = {source[i]["image"].shape for i in range(len(source))}
    assert len(sizes) > 1  # variable-size images
    run = lambda: list(  # noqa: E731
      streaming.iterate_host_batches(source, keys, 2, 4, 4, transform="imagenet")
    )
    first, again = run(), run()
    device_images, device_labels = streaming.put_batches(first, 2, 4)
    evaluated = streamed_data.read_eval_arrays(source, "imagenet")
  assert len(first) == 2
  for (images, labels), (images2, labels2) in zip(first, again, strict=True):
    assert images.shape == (2, 4, 224, 224, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(labels, labels2)
  assert device_images.shape == (2, 2, 4, 224, 224, 3) and device_labels.shape == (2, 2, 4)
  assert not np.array_equal(first[0][0][0], first[0][0][1])  # particles get their own crops
  assert evaluated[0].shape == (12, 224, 224, 3)


def test_random_resized_crop_boxes_follow_the_recipe():
  rng = np.random.default_rng(0)
  for height, width in [(300, 400), (500, 120), (64, 64)]:
    for _ in range(50):
      top, left, h, w = augmentation.sample_crop_box(height, width, rng)
      assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
      area = h * w / (height * width)
      assert 0.07 <= area <= 1.0
  a = augmentation.random_resized_crop_and_flip(
    np.zeros((40, 60, 3), np.uint8), augmentation.example_rng([1, 2], 3, 4)
  )
  assert a.shape == (224, 224, 3)
  image = np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3)
  crop = augmentation.resize_and_center_crop(image)
  assert crop.shape == (224, 224, 3)


def test_auto_pipeline_keeps_small_sets_on_device_and_streams_large_or_ragged(monkeypatch):
  monkeypatch.setattr(streaming, "device_memory_bytes", lambda: 1000)
  assert streaming.choose_pipeline("auto", 250, (1,), 1) == "device"  # 1/4 of the memory
  assert streaming.choose_pipeline("auto", 251, (1,), 1) == "stream"
  assert streaming.choose_pipeline("auto", 1, (None, None, 3), 1) == "stream"
  assert streaming.choose_pipeline("stream", 1, (1,), 1) == "stream"
  assert streaming.choose_pipeline("device", 10**9, (1,), 1) == "device"
  monkeypatch.undo()
  assert streamed_data.resolve_pipeline(create_tiny_config()) == "device"


def test_bad_pipeline_values_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="dataset.pipeline must be 'auto', 'device' or 'stream'"):
    swamp_jax.validate_config(create_tiny_config(dataset__pipeline="disk"))
  with pytest.raises(ValueError, match="dataset.stream_workers must be >= 0"):
    swamp_jax.validate_config(create_tiny_config(dataset__stream_workers=-1))
  with pytest.raises(ValueError, match="dataset.pipeline must be one of"):
    streaming.choose_pipeline("disk", 1, (1,), 1)
  with pytest.raises(ValueError, match="2 images but 3 labels"):
    streaming.ArraySource(np.zeros((2, 1, 1, 1)), np.zeros(3))
