"""Reading a TFDS classification dataset into host arrays, with ``tfds.data_source``.

No TensorFlow: ``tfds.data_source`` reads the prepared ArrayRecord files.
Split names and feature keys are checked against the dataset's metadata
before any example is read, and errors list the ones the dataset has.
Decoded arrays may be cached as one ``.npz`` per dataset and choice of
splits and keys.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np


def read_splits(
  name: str,
  data_dir: str | None,
  train_split: str,
  test_split: str,
  image_key: str,
  label_key: str,
  cache_dir: str | None = None,
  train_rows: tuple[int, int] | None = None,
):
  """``((x_train, y_train), (x_test, y_test), num_classes)`` of a TFDS dataset.

  ``train_rows`` (start, stop) reads only those rows of the training split
  (one process's shard; never cached). See ``datasets.Dataset.from_tfds``.
  """
  builder = create_builder(name, data_dir, image_key, label_key)
  check_splits(name, builder, train_split, test_split)
  num_classes = int(builder.info.features[label_key].num_classes)
  cache = None
  if cache_dir and train_rows is None:
    fields = f"{name}|{builder.info.version}|{train_split}|{test_split}|{image_key}|{label_key}"
    key = hashlib.sha1(fields.encode()).hexdigest()[:12]
    cache = os.path.join(os.path.expanduser(cache_dir), f"{name.replace('/', '_')}-{key}.npz")
    cached = load_cached_splits(cache)
    if cached is not None:
      return (*cached, num_classes)
  if not builder.is_prepared():
    builder.download_and_prepare()
    check_splits(name, builder, train_split, test_split)
  x_tr, y_tr = read_split(name, train_split, data_dir, image_key, label_key, train_rows)
  x_te, y_te = read_split(name, test_split, data_dir, image_key, label_key)
  if cache:
    save_cached_splits(cache, (x_tr, y_tr), (x_te, y_te))
  return (x_tr, y_tr), (x_te, y_te), num_classes


def load_cached_splits(path: str):
  """``((x_train, y_train), (x_test, y_test))`` cached at ``path``, or None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return (z["xtr"], z["ytr"]), (z["xte"], z["yte"])


def save_cached_splits(path: str, train, test):
  """Caches two splits' arrays at ``path`` (atomic: a killed writer never leaves a bad
  cache, and processes writing at once leave one whole file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp{os.getpid()}.npz"
  np.savez(tmp, xtr=train[0], ytr=train[1], xte=test[0], yte=test[1])
  os.replace(tmp, path)


def create_builder(
  name: str, data_dir: str | None, image_key="image", label_key="label", fixed_shape=True
):
  """The TFDS builder of a classification dataset (of fixed-shape inputs unless not
  ``fixed_shape``: a streamed run crops them), or a ValueError naming why."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises its own DatasetNotFoundError subclasses.
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__  # not its 300 names
    raise ValueError(
      f"unknown dataset {name!r}: not 'digits' and not a TFDS dataset ({first_line})"
    ) from e
  features = builder.info.features
  for field, key in (("image_key", image_key), ("label_key", label_key)):
    if key not in features:
      raise ValueError(
        f"dataset {name!r} has no feature {key!r} (dataset.{field}); its features: "
        f"{sorted(features)}"
      )
  if not hasattr(features[label_key], "num_classes"):
    raise ValueError(
      f"feature {label_key!r} of {name!r} is not a ClassLabel, so the number of classes is "
      "unknown: read its arrays yourself and use Dataset.from_arrays"
    )
  shape = getattr(features[image_key], "shape", ())
  if fixed_shape and any(d is None for d in shape):
    raise ValueError(
      f"inputs {image_key!r} of {name!r} vary in shape {tuple(shape)}; a run holds "
      "fixed-shape inputs on the device: stream them (dataset.pipeline='stream' or 'auto', "
      "with ImageNet's random-resized crops), resize them and use Dataset.from_arrays, or "
      "pick a fixed-size variant of the dataset"
    )
  return builder


def _split_names(split: str) -> list[str]:
  """The split names a TFDS split string reads ('train[:90%]+validation' -> both)."""
  return [re.split(r"[\[(]", part)[0].strip() for part in split.split("+")]


def check_splits(name: str, builder, train_split: str, test_split: str) -> None:
  """A prepared dataset must have the named splits (checked before reading either)."""
  if not builder.is_prepared():
    return  # split names are known once prepared
  splits = sorted(builder.info.splits)
  for field, split in (("train_split", train_split), ("test_split", test_split)):
    for base in _split_names(split):
      if base not in splits:
        raise ValueError(
          f"dataset {name!r} has no {base!r} split (it has {splits}); set dataset.{field} "
          "to one of them"
        )


def read_split(name: str, split: str, data_dir, image_key: str, label_key: str, rows=None):
  """Inputs and int64 labels of ``split`` (any TFDS split string, sliced or not);
  ``rows`` (start, stop): only those rows of it are read."""
  import tensorflow_datasets as tfds

  source = tfds.data_source(name, split=split, data_dir=data_dir)
  start, stop = (0, len(source)) if rows is None else (rows[0], min(rows[1], len(source)))
  images, labels = [], []
  chunk = 4096
  for first in range(start, stop, chunk):
    records = source.__getitems__(list(range(first, min(first + chunk, stop))))
    images.append(np.stack([r[image_key] for r in records]))
    labels.append(np.asarray([r[label_key] for r in records], dtype=np.int64))
  return np.concatenate(images), np.concatenate(labels)
