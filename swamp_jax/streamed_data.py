"""A run's data when ``dataset.pipeline`` streams it: the training source, the
evaluation sets, and the ``streaming.TrainStream`` that feeds the steps.

The training rows are the ones ``datasets.load_dataset`` keeps (the same fixed
seed-0 permutation decides ``train_size`` and ``validation_size``), so a
streamed run trains on the same examples in the same orders as an in-device
run. Nothing of the dataset stays in device memory: the BatchNorm recompute
pass reads its batches through the host (``streamed_batchnorm``), and the test
and validation sets (ImageNet's through the evaluation crop: 50,000 x 224 x 224
x 3 bytes, 7.5 GB) stay in host memory, evaluated batch by batch
(``streamed_evaluation``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from swamp_jax import augmentation, datasets, imp, particles, streaming
from swamp_jax import data as data_lib


class StreamedDataset(NamedTuple):
  """What a run needs to know of a streamed dataset (the fields of ``datasets.Dataset``
  that ``run_setup`` reads, and the training source)."""

  name: str
  num_classes: int
  image_shape: tuple
  train: Any  # random-access source of the training rows
  transform: str  # streaming.TRANSFORMS (on the host)
  augment: str = "none"  # the in-step augmentation of dataset.augment='auto'


def _tfds_info(d):
  builder = datasets.tfds_source.create_builder(
    d.name, d.data_dir, d.image_key, d.label_key, fixed_shape=False
  )
  feature = builder.info.features[d.image_key]
  num = builder.info.splits[d.train_split].num_examples if builder.is_prepared() else 0
  return builder, tuple(feature.shape), np.dtype(feature.np_dtype).itemsize, num


class _KeyedSource:
  """A TFDS data source whose records are read as ``{'image', 'label'}`` (the config's
  ``dataset.image_key`` and ``dataset.label_key``)."""

  def __init__(self, source, image_key: str, label_key: str):
    self.source, self.image_key, self.label_key = source, image_key, label_key

  def __len__(self) -> int:
    return len(self.source)

  def _rename(self, record):
    return {"image": record[self.image_key], "label": record[self.label_key]}

  def __getitem__(self, index):
    return self._rename(self.source[int(index)])

  def __getitems__(self, indices):
    return [self._rename(r) for r in streaming.read_records(self.source, indices)]


def resolve_pipeline(config, dataset: datasets.Dataset | None = None) -> str:
  """'device' or 'stream': ``config.dataset.pipeline``, 'auto' decided by
  ``streaming.choose_pipeline`` from the training set's size and shape."""
  d = config.dataset
  if d.pipeline != "auto":
    return streaming.choose_pipeline(d.pipeline, 0, (), 1)
  if dataset is not None:  # in memory already
    x = dataset.train_images
    return streaming.choose_pipeline(d.pipeline, len(x), x.shape[1:], x.dtype.itemsize)
  if d.name == datasets.DIGITS:  # 1,437 8x8 images
    return streaming.choose_pipeline(d.pipeline, 0, (), 1)
  _, shape, itemsize, num = _tfds_info(d)
  return streaming.choose_pipeline(d.pipeline, num, shape, itemsize)


def read_eval_images(source, indices, transform: str) -> tuple[np.ndarray, np.ndarray]:
  """Records ``indices`` of ``source`` as evaluation sees them: (stored images [k, H, W, C],
  int32 labels [k]); ImageNet-like images through ``augmentation.resize_and_center_crop``."""
  if transform == "none" and hasattr(source, "read_arrays"):  # one gather, no record dicts
    images, labels = source.read_arrays(np.asarray(indices))
    return images, np.asarray(labels, np.int32)
  records = streaming.read_records(source, indices)
  x = [np.asarray(r["image"]) for r in records]
  if transform == "imagenet":
    x = [augmentation.resize_and_center_crop(i) for i in x]
  return np.stack(x), np.asarray([r["label"] for r in records], np.int32)


def read_eval_arrays(source, transform: str, empty=((0,), np.uint8), chunk: int = 1024):
  """All of ``source`` as (stored images [n, H, W, C], int32 labels [n]) (``read_eval_images``);
  an empty source (no held-out validation rows) as arrays of ``empty``'s (image shape, dtype)."""
  chunks = [
    read_eval_images(source, range(start, min(start + chunk, len(source))), transform)
    for start in range(0, len(source), chunk)
  ]
  if not chunks:
    return np.zeros((0, *empty[0]), empty[1]), np.zeros((0,), np.int32)
  return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks])


def compute_source_stats(source, chunk: int = 4096):
  """Per-channel float32 (mean, std) of every image of ``source``, read in chunks
  (equal to ``datasets.load_dataset``'s for integer images: float64 sums are exact)."""
  sums = 0.0
  for start in range(0, len(source), chunk):
    records = streaming.read_records(source, range(start, min(start + chunk, len(source))))
    sums = sums + data_lib.compute_channel_sums(np.stack([r["image"] for r in records]))
  return data_lib.compute_channel_stats(*sums)


def open_dataset(config, dataset: datasets.Dataset | None = None):
  """(StreamedDataset, (test images, labels), (validation images, labels), mean, std).

  The training rows, and the held-out validation rows, are those of
  ``datasets.load_dataset`` (``Dataset.hold_out``'s fixed permutation).
  """
  d = config.dataset
  if dataset is not None or d.name == datasets.DIGITS:
    # Already in host memory (or tiny): streaming it is for comparisons and tests.
    ds = datasets.load_dataset(config, dataset)
    train = streaming.ArraySource(ds.train_images, ds.train_labels)
    streamed = StreamedDataset(ds.name, ds.num_classes, ds.image_shape, train, "none", ds.augment)
    splits = (ds.test_images, ds.test_labels), (ds.validation_images, ds.validation_labels)
    return streamed, *splits, ds.mean, ds.std
  import tensorflow_datasets as tfds

  builder, shape, _, _ = _tfds_info(d)
  if not builder.is_prepared():
    builder.download_and_prepare()

  def source(split):
    return _KeyedSource(
      tfds.data_source(d.name, split=split, data_dir=d.data_dir), d.image_key, d.label_key
    )

  transform = "imagenet" if any(s is None for s in shape) else "none"
  whole = source(d.train_split)
  train_rows, val_rows = datasets.compute_held_out_rows(
    len(whole), d.validation_size, d.train_size, d.name
  )
  train = streaming.RowsSource(whole, train_rows)
  if transform == "imagenet":
    shape = (augmentation.IMAGE_SIZE, augmentation.IMAGE_SIZE, shape[-1])
  dtype = builder.info.features[d.image_key].np_dtype
  test = read_eval_arrays(source(d.test_split), transform, (shape, dtype))
  validation = read_eval_arrays(streaming.RowsSource(whole, val_rows), transform, (shape, dtype))
  if transform == "imagenet":
    mean, std = augmentation.IMAGENET_MEAN, augmentation.IMAGENET_STD
  else:
    mean, std = compute_source_stats(train)
  num_classes = int(builder.info.features[d.label_key].num_classes)
  # ImageNet-like inputs are augmented on the host (random-resized crops), not in the step.
  augment = "none" if transform == "imagenet" else datasets.default_augment(d.name)
  streamed = StreamedDataset(d.name, num_classes, shape, train, transform, augment)
  return streamed, test, validation, mean, std


def load_streamed_data(config, placement, dataset: datasets.Dataset | None = None):
  """``run_setup.load_data`` for a streamed run: (StreamedDataset, DeviceData holding
  only the statistics (no images), EvalData of host arrays, number of training examples)."""
  streamed, test, validation, mean, std = open_dataset(config, dataset)
  empty = np.zeros((0, *streamed.image_shape), np.uint8)
  mean, std = placement.replicate((mean, std))
  train = particles.DeviceData(*placement.replicate((empty, np.zeros((0,), np.int32))), mean, std)
  # Kept on the host: the rounds evaluate them batch by batch (streamed_evaluation).
  eval_data = imp.EvalData(*test, *validation)
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
