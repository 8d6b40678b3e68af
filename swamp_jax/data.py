"""Datasets held in device memory, and per-particle batches drawn inside jit.

Any TFDS image-classification dataset is read with ``tfds.data_source`` (no
TensorFlow), decoded once into numpy arrays and cached. ``digits`` is
scikit-learn's real 8x8 handwritten digits, shipped inside scikit-learn, so
the embedded default needs no download.

Training never runs a Python input loop: the whole (small) training set sits
on the device in its stored dtype, and each particle's batch for a step is a
gather of indices from that particle's own permutation of the epoch.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DIGITS = "digits"
# Datasets whose standard recipe adds random crop (pad 4) and horizontal flip.
_AUGMENTED_PREFIXES = ("cifar",)


class Dataset(NamedTuple):
  """A classification dataset as arrays.

  Images are [n, H, W, C] in their stored dtype (uint8 for TFDS image
  datasets); labels are int32 [n]. ``mean``/``std`` are per-channel float32
  [C] statistics of the training images, in the stored scale.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  validation_images: np.ndarray
  validation_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


def default_augment(name: str) -> bool:
  """Whether the standard recipe for ``name`` uses random crop and flip."""
  return name.startswith(_AUGMENTED_PREFIXES)


def _load_digits():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # values 0..16
  labels = digits.target.astype(np.int32)
  # A fixed stratified 80/20 split, the same on every machine.
  x_tr, x_te, y_tr, y_te = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  return (x_tr, y_tr), (x_te, y_te), 10


def _read_tfds_split(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  source = tfds.data_source(name, split=split, data_dir=data_dir)
  images, labels = [], []
  chunk = 4096
  for start in range(0, len(source), chunk):
    records = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    images.append(np.stack([r["image"] for r in records]))
    labels.append(np.asarray([r["label"] for r in records], dtype=np.int32))
  return np.concatenate(images), np.concatenate(labels)


def _tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of an image-classification dataset, or a ValueError naming ``name``."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises its own DatasetNotFoundError subclasses.
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__  # not its 300 names
    raise ValueError(
      f"unknown dataset {name!r}: not 'digits' and not a TFDS dataset ({first_line})"
    ) from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(
      f"dataset {name!r} is not an image-classification dataset (features: {list(features)})"
    )
  return builder


def _load_tfds(name: str, data_dir: str | None, cache_dir: str | None, train_rows=None):
  builder = _tfds_builder(name, data_dir)
  features = builder.info.features
  num_classes = int(features["label"].num_classes)
  _check_splits(name, builder)
  cache = None
  if train_rows is not None:  # one process's rows: read just those, no cache
    if not builder.is_prepared():
      builder.download_and_prepare()
      _check_splits(name, builder)
    x_tr, y_tr = _read_tfds_split(name, f"train[{train_rows[0]}:{train_rows[1]}]", data_dir)
    x_te, y_te = _read_tfds_split(name, "test", data_dir)
    return (x_tr, y_tr), (x_te, y_te), num_classes
  if cache_dir:
    key = hashlib.sha1(f"{name}|{builder.info.version}".encode()).hexdigest()[:12]
    cache = os.path.join(os.path.expanduser(cache_dir), f"{name.replace('/', '_')}-{key}.npz")
    if os.path.exists(cache):
      with np.load(cache) as z:
        return (z["xtr"], z["ytr"]), (z["xte"], z["yte"]), num_classes
  if not builder.is_prepared():
    builder.download_and_prepare()
    _check_splits(name, builder)
  x_tr, y_tr = _read_tfds_split(name, "train", data_dir)
  x_te, y_te = _read_tfds_split(name, "test", data_dir)
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + f".tmp{os.getpid()}.npz"
    np.savez(tmp, xtr=x_tr, ytr=y_tr, xte=x_te, yte=y_te)
    os.replace(tmp, cache)  # atomic: a killed writer never leaves a bad cache
  return (x_tr, y_tr), (x_te, y_te), num_classes


def _check_splits(name: str, builder) -> None:
  """A prepared dataset must have 'train' and 'test' splits (checked before reading either)."""
  if not builder.is_prepared():
    return  # split names are known once prepared
  splits = list(builder.info.splits)
  missing = [s for s in ("train", "test") if s not in splits]
  if missing:
    raise ValueError(
      f"dataset {name!r} has no {' or '.join(repr(s) for s in missing)} split (it has "
      f"{splits}); swamp_jax trains on 'train' and reports on 'test'"
    )


def check_dataset(name: str, data_dir: str | None = None) -> None:
  """Raises ValueError if ``name`` is not a usable dataset, without reading its examples.

  Unknown names and prepared TFDS datasets lacking a 'train' or 'test' split
  are caught here (a run checks this before it writes anything).
  """
  if name == DIGITS:
    return
  builder = _tfds_builder(name, data_dir)
  _check_splits(name, builder)


def count_train_examples(name: str, data_dir: str | None = None) -> int:
  """Size of the training split, without reading it."""
  if name == DIGITS:
    return len(_load_digits()[0][1])
  return int(_tfds_builder(name, data_dir).info.splits["train"].num_examples)


def load_dataset(
  name: str,
  data_dir: str | None = None,
  validation_size: int = 0,
  cache_dir: str | None = "~/.cache/swamp_jax",
  train_rows: tuple[int, int] | None = None,
  train_size: int = 0,
) -> Dataset:
  """Loads ``name`` ('digits' or a TFDS image-classification dataset).

  Args:
    name: 'digits' (embedded, scikit-learn) or a TFDS name such as 'mnist',
      'fashion_mnist', 'cifar10', 'cifar100'.
    data_dir: TFDS data directory (None: TFDS's default, or $TFDS_DATA_DIR).
    validation_size: examples held out of the training split (the last ones
      of a fixed seed-0 permutation, the same whatever the run's seed).
    cache_dir: where decoded TFDS arrays are cached (None: no cache).
    train_rows: (start, stop): read only these rows of the training split
      (one process's shard, TFDS split slicing); ``mean``/``std`` are then
      of these rows only, and ``validation_size`` must be 0.
    train_size: train on only this many examples (the first ones of the same
      fixed permutation, so the subset and the validation split never meet
      and are the same for every seed and method); 0: all the rest.

  Returns:
    A ``Dataset``.
  """
  if train_rows is not None and validation_size:
    raise ValueError(
      "a validation split cannot be held out when each process reads only its "
      "shard of the training set; set dataset.validation_size=0"
    )
  if name == DIGITS:
    (x_tr, y_tr), (x_te, y_te), num_classes = _load_digits()
    if train_rows is not None:
      x_tr, y_tr = x_tr[train_rows[0] : train_rows[1]], y_tr[train_rows[0] : train_rows[1]]
  else:
    (x_tr, y_tr), (x_te, y_te), num_classes = _load_tfds(name, data_dir, cache_dir, train_rows)
  if not 0 <= validation_size < len(x_tr):
    raise ValueError(
      f"validation_size must be in [0, {len(x_tr)}) for {name!r}, got {validation_size}"
    )
  available = len(x_tr) - validation_size
  if not 0 <= train_size <= available:
    raise ValueError(
      f"train_size must be in [0, {available}] for {name!r} with validation_size="
      f"{validation_size} (0: all), got {train_size}"
    )
  order = np.random.default_rng(0).permutation(len(x_tr))
  train_idx = np.sort(order[: train_size or available])
  val_idx = np.sort(order[len(x_tr) - validation_size :])
  x_val, y_val = x_tr[val_idx], y_tr[val_idx]
  x_tr, y_tr = x_tr[train_idx], y_tr[train_idx]
  mean, std = compute_channel_stats(*compute_channel_sums(x_tr))
  return Dataset(name, x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes, mean, std)


def compute_channel_sums(images: np.ndarray) -> np.ndarray:
  """[3, C] float64: per-channel sum, sum of squares, and pixel count (to combine shards)."""
  x = images.reshape(-1, images.shape[-1]).astype(np.float64)
  return np.stack([x.sum(0), (x * x).sum(0), np.full(x.shape[-1], x.shape[0], np.float64)])


def compute_channel_stats(total: np.ndarray, sq_total: np.ndarray, count: np.ndarray):
  """Per-channel float32 (mean, std) from ``compute_channel_sums`` rows."""
  mean = total / count
  std = np.sqrt(np.maximum(sq_total / count - mean * mean, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def compute_epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The order in which one particle visits the training set in ``epoch``.

  A pure function of (key, epoch): resuming at any step re-derives it.
  Returns int32 [num_examples].
  """
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def compute_batch_indices(permutation: jax.Array, step_in_epoch, batch_size: int) -> jax.Array:
  """Indices [batch_size] of batch ``step_in_epoch`` of an epoch's permutation."""
  return jax.lax.dynamic_slice_in_dim(permutation, step_in_epoch * batch_size, batch_size)


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Stored images [b, H, W, C] -> normalized float32."""
  return (images.astype(jnp.float32) - mean) / std


def augment(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Random crop (zero pad by ``padding``) and horizontal flip, per example.

  Args:
    key: PRNG key for this batch.
    images: float32 [b, H, W, C], already normalized (so zero padding is the
      mean, as in the usual recipe applied after normalization).

  Returns:
    float32 [b, H, W, C].
  """
  b, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)
