"""A run's data when ``dataset.pipeline`` streams it: the training source, the
evaluation sets, and the ``streaming.TrainStream`` that feeds the steps.

The training rows are the ones ``data.load_dataset`` keeps (the same fixed
seed-0 permutation decides ``train_size`` and ``validation_size``), so a
streamed run trains on the same examples in the same orders as an in-device
run. What still sits in device memory in a streamed run: the test and
validation sets (ImageNet's through the evaluation crop: 50,000 x 224 x 224 x 3
bytes, 7.5 GB, on every device), and, for models with BatchNorm and
``bn_recompute``, the training set for the recompute pass (refused where the
images have no fixed shape).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from swamp_jax import augmentation, imp, particles, streaming
from swamp_jax import data as data_lib


class StreamedDataset(NamedTuple):
  """What a run needs to know of a streamed dataset (the fields of ``data.Dataset``
  that ``run_setup`` reads, and the training source)."""

  name: str
  num_classes: int
  image_shape: tuple
  train: Any  # random-access source of the training rows
  transform: str  # streaming.TRANSFORMS


def _tfds_info(name: str, data_dir):
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  feature = builder.info.features["image"]
  num = builder.info.splits["train"].num_examples if builder.is_prepared() else 0
  return builder, tuple(feature.shape), np.dtype(feature.np_dtype).itemsize, num


def resolve_pipeline(config) -> str:
  """'device' or 'stream': ``config.dataset.pipeline``, 'auto' decided by
  ``streaming.choose_pipeline`` from the training set's size and shape."""
  d = config.dataset
  if d.pipeline != "auto" or d.name == data_lib.DIGITS:  # digits: 1,437 8x8 images
    return streaming.choose_pipeline(d.pipeline, 0, (), 1)
  _, shape, itemsize, num = _tfds_info(d.name, d.data_dir)
  return streaming.choose_pipeline(d.pipeline, num, shape, itemsize)


def split_rows(num_rows: int, validation_size: int, train_size: int, name: str):
  """(train rows, validation rows) as ``data.load_dataset`` chooses them."""
  if not 0 <= validation_size < num_rows:
    raise ValueError(
      f"validation_size must be in [0, {num_rows}) for {name!r}, got {validation_size}"
    )
  available = num_rows - validation_size
  if not 0 <= train_size <= available:
    raise ValueError(
      f"train_size must be in [0, {available}] for {name!r} with validation_size="
      f"{validation_size} (0: all), got {train_size}"
    )
  order = np.random.default_rng(0).permutation(num_rows)
  return np.sort(order[: train_size or available]), np.sort(order[num_rows - validation_size :])


def read_eval_arrays(source, transform: str, chunk: int = 1024):
  """All of ``source`` as (stored images [n, H, W, C], int32 labels [n]); ImageNet-like
  images through ``augmentation.resize_and_center_crop``."""
  images, labels = [], []
  for start in range(0, len(source), chunk):
    records = streaming.read_records(source, range(start, min(start + chunk, len(source))))
    x = [np.asarray(r["image"]) for r in records]
    if transform == "imagenet":
      x = [augmentation.resize_and_center_crop(i) for i in x]
    images.append(np.stack(x))
    labels.append(np.asarray([r["label"] for r in records], np.int32))
  return np.concatenate(images), np.concatenate(labels)


def compute_source_stats(source, chunk: int = 4096):
  """Per-channel float32 (mean, std) of every image of ``source``, read in chunks
  (equal to ``data.load_dataset``'s for integer images: float64 sums are exact)."""
  sums = 0.0
  for start in range(0, len(source), chunk):
    records = streaming.read_records(source, range(start, min(start + chunk, len(source))))
    sums = sums + data_lib.compute_channel_sums(np.stack([r["image"] for r in records]))
  return data_lib.compute_channel_stats(*sums)


def open_dataset(config):
  """(StreamedDataset, (test images, labels), (validation images, labels), mean, std)."""
  d = config.dataset
  if d.name == data_lib.DIGITS:
    # The embedded set is tiny; streaming it is for tests and comparisons.
    ds = data_lib.load_dataset(d.name, validation_size=d.validation_size, train_size=d.train_size)
    train = streaming.ArraySource(ds.train_images, ds.train_labels)
    streamed = StreamedDataset(d.name, ds.num_classes, ds.image_shape, train, "none")
    splits = (ds.test_images, ds.test_labels), (ds.validation_images, ds.validation_labels)
    return streamed, *splits, ds.mean, ds.std
  import tensorflow_datasets as tfds

  builder, shape, _, _ = _tfds_info(d.name, d.data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  transform = "imagenet" if any(s is None for s in shape) else "none"
  source = tfds.data_source(d.name, split="train", data_dir=d.data_dir)
  train_rows, val_rows = split_rows(len(source), d.validation_size, d.train_size, d.name)
  train = streaming.RowsSource(source, train_rows)
  test_split = "test" if "test" in builder.info.splits else "validation"
  test = read_eval_arrays(
    tfds.data_source(d.name, split=test_split, data_dir=d.data_dir), transform
  )
  validation = read_eval_arrays(streaming.RowsSource(source, val_rows), transform)
  if transform == "imagenet":
    shape = (augmentation.IMAGE_SIZE, augmentation.IMAGE_SIZE, shape[-1])
    mean, std = augmentation.IMAGENET_MEAN, augmentation.IMAGENET_STD
  else:
    mean, std = compute_source_stats(train)
  num_classes = int(builder.info.features["label"].num_classes)
  return StreamedDataset(d.name, num_classes, shape, train, transform), test, validation, mean, std


def load_streamed_data(config, placement):
  """``run_setup.load_data`` for a streamed run: (StreamedDataset, DeviceData holding
  only the statistics (no images), EvalData, number of training examples)."""
  streamed, test, validation, mean, std = open_dataset(config)
  empty = np.zeros((0, *streamed.image_shape), np.uint8)
  mean, std = placement.replicate((mean, std))
  train = particles.DeviceData(*placement.replicate((empty, np.zeros((0,), np.int32))), mean, std)
  eval_data = imp.EvalData(*placement.replicate((*test, *validation)))
  return streamed, train, eval_data, len(streamed.train)


def create_train_stream(
  config, streamed: StreamedDataset, train: particles.DeviceData, programs, placement
):
  """The ``TrainStream`` of a run. ``programs``: {'pretrain': (model, tx, spec), 'rounds': ...}."""
  steps = {k: streaming.create_step_program(*v, placement) for k, v in programs.items()}
  return streaming.TrainStream(
    streamed.train,
    config.batch_size,
    streamed.transform,
    augmentation.IMAGE_SIZE,
    config.dataset.stream_workers,
    train.mean,
    train.std,
    placement,
    steps,
  )


def stage_recompute_images(config, streamed: StreamedDataset, train, batch_stats, placement):
  """``train`` with the training images that ``finish``'s BatchNorm recompute reads (all of
  them), for models with BatchNorm and ``bn_recompute``; else ``train`` unchanged.

  Raises:
    ValueError: the images have no fixed shape (not implemented: the recompute pass
      is not streamed yet).
  """
  import jax

  if not (config.bn_recompute.enabled and jax.tree_util.tree_leaves(batch_stats)):
    return train
  if streamed.transform != "none":
    raise ValueError(
      f"dataset {streamed.name!r} is streamed (pipeline='stream') and its images have no "
      "fixed shape, but recomputing BatchNorm statistics reads the training set from device "
      "memory (not streamed yet); set bn_recompute.enabled=False"
    )
  images, labels = read_eval_arrays(streamed.train, "none")
  return train._replace(images=placement.replicate(images), labels=placement.replicate(labels))
