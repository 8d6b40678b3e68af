"""The one dataset type of a run, its constructors, and the one path from a config to it.

A ``Dataset`` is three splits of host arrays (train, validation, test) with
the training inputs' normalization statistics. It is built from your arrays
(``Dataset.from_arrays``), from any TFDS classification dataset
(``Dataset.from_tfds``, read with ``tfds.data_source``, no TensorFlow), or is
the embedded default (``Dataset.from_digits``: scikit-learn's real 8x8
digits, no download). Every constructor goes through the same checks, so bad
labels or shapes are refused before anything is trained or written.

``load_dataset(config, dataset=None)`` is the one path a run, a saved run and
every analysis take to the arrays a run trains on: the config's dataset (or
an in-memory one) with ``validation_size`` and ``train_size`` applied.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import ml_collections
import numpy as np

from swamp_jax import data as data_lib
from swamp_jax import tfds_source

DIGITS = "digits"
AUGMENTATIONS = ("none", "crop_flip")  # 'crop_flip': CIFAR's random crop (pad 4) and flip
# Datasets whose standard recipe is random crop and horizontal flip ('auto' picks it).
_CROP_FLIP_PREFIXES = ("cifar",)


def default_augment(name: str) -> str:
  """The augmentation ``dataset.augment='auto'`` means for ``name``."""
  return "crop_flip" if name.startswith(_CROP_FLIP_PREFIXES) else "none"


class Dataset(NamedTuple):
  """A classification dataset as host arrays.

  Inputs ``*_images`` are [n, ...]: images [n, H, W, C] or feature vectors
  [n, F], in their stored dtype (uint8 for TFDS images); labels are int32
  [n] in [0, num_classes). ``mean``/``std`` are float32 statistics of the
  training inputs over their last axis (per channel for images, per
  feature for feature vectors), in the stored scale. ``augment`` is this
  dataset's default augmentation (``AUGMENTATIONS``), which
  ``dataset.augment='auto'`` uses.
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
  augment: str = "none"

  @property
  def image_shape(self) -> tuple[int, ...]:
    """The shape of one input (H, W, C) or (F,)."""
    return tuple(self.train_images.shape[1:])

  @classmethod
  def from_arrays(
    cls,
    train: tuple,
    test: tuple,
    validation: tuple | None = None,
    *,
    num_classes: int | None = None,
    name: str = "arrays",
    augment: str = "none",
  ) -> Dataset:
    """Your arrays as a dataset.

    Args:
      train, test, validation: ``(x, y)`` pairs: x [n, ...] with a leading
        example axis (images [n, H, W, C] or features [n, F], any numeric
        dtype; kept as given and normalized on the device), y integer labels
        [n] >= 0. ``validation`` (optional) is reported as
        ``validation_accuracy``; or hold rows of ``train`` out with
        ``dataset.validation_size``.
      num_classes: the model's outputs; None: the largest label + 1.
      name: recorded in the run's config.json (with a digest of the arrays).
      augment: 'none', or 'crop_flip' for images [n, H, W, C].

    Returns:
      A ``Dataset`` with ``mean``/``std`` of the training inputs over their
      last axis (per channel or per feature).

    Raises:
      ValueError: x and y differ in length, y is not integers or is
        negative or >= num_classes, inputs of the splits differ in shape, a
        split is empty, or augment does not fit the inputs; naming the split.
    """
    if validation is None:
      x, _ = _check_pair("train", train)
      validation = (np.zeros((0, *x.shape[1:]), x.dtype), np.zeros((0,), np.int32))
    return _create(name, train, validation, test, num_classes, augment)

  @classmethod
  def from_digits(cls, cache_dir: str | None = None) -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits (uint8 values 0..16, [n, 8, 8, 1]),
    in a fixed stratified 80/20 train/test split, the same on every machine.

    Args:
      cache_dir: where the split arrays are cached (None: no cache), per
        scikit-learn version. Importing scikit-learn takes 1.3 s of every
        process that loads the digits (scipy.stats comes with it); a cached
        split loads in milliseconds.
    """
    import importlib.metadata

    cache = None
    if cache_dir:
      version = importlib.metadata.version("scikit-learn")
      cache = os.path.join(os.path.expanduser(cache_dir), f"{DIGITS}-sklearn{version}.npz")
      cached = tfds_source.load_cached_splits(cache)
      if cached is not None:
        return cls.from_arrays(*cached, num_classes=10, name=DIGITS)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
      images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    if cache:
      tfds_source.save_cached_splits(cache, (x_tr, y_tr), (x_te, y_te))
    return cls.from_arrays((x_tr, y_tr), (x_te, y_te), num_classes=10, name=DIGITS)

  @classmethod
  def from_tfds(
    cls,
    name: str,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    *,
    cache_dir: str | None = None,
    train_rows: tuple[int, int] | None = None,
    augment: str | None = None,
  ) -> Dataset:
    """A TFDS classification dataset with fixed-shape inputs, decoded into arrays.

    Args:
      name: a TFDS name ('mnist', 'cifar10', 'imagenet_resized/32x32', ...).
      data_dir: TFDS data directory (None: TFDS's default, or $TFDS_DATA_DIR).
      train_split, test_split: the splits trained on and reported (e.g.
        test_split='validation' for imagenet_resized); TFDS slicing such as
        'train[:90%]' works.
      image_key, label_key: the features holding the input and the label
        (a ``ClassLabel``, which gives ``num_classes``).
      cache_dir: where decoded arrays are cached (None: no cache).
      train_rows: (start, stop): read only these rows of the training split
        (one process's shard); ``mean``/``std`` are then of these rows.
      augment: None: ``default_augment(name)``.

    Returns:
      A ``Dataset`` without a validation split (hold one out with
      ``dataset.validation_size``).

    Raises:
      ValueError: an unknown name, a split or key the dataset lacks (the
        available ones are listed), inputs of variable shape.
    """
    train, test, num_classes = tfds_source.read_splits(
      name, data_dir, train_split, test_split, image_key, label_key, cache_dir, train_rows
    )
    augment = default_augment(name) if augment is None else augment
    return _create(name, train, _empty_like(train[0]), test, num_classes, augment)

  def hold_out(self, validation_size: int = 0, train_size: int = 0) -> Dataset:
    """The training split with ``validation_size`` examples held out, and
    optionally cut to ``train_size`` (0: all the rest).

    The held-out examples are the last ones of a fixed seed-0 permutation
    (the same whatever the run's seed); the kept ones its first, so a subset
    and the validation split never meet. ``mean``/``std`` are recomputed
    from the rows kept. With both sizes 0 the dataset is returned as is.
    """
    if not (validation_size or train_size):
      return self
    n = len(self.train_labels)
    if validation_size and len(self.validation_labels):
      raise ValueError(
        f"dataset {self.name!r} has its own validation split ({len(self.validation_labels)} "
        f"examples); set dataset.validation_size=0, got {validation_size}"
      )
    train_idx, val_idx = compute_held_out_rows(n, validation_size, train_size, self.name)
    x, y = self.train_images, self.train_labels
    if validation_size:
      validation = (x[val_idx], y[val_idx])
    else:
      validation = (self.validation_images, self.validation_labels)
    mean, std = data_lib.compute_channel_stats(*data_lib.compute_channel_sums(x[train_idx]))
    return self._replace(
      train_images=x[train_idx],
      train_labels=y[train_idx],
      validation_images=validation[0],
      validation_labels=validation[1],
      mean=mean,
      std=std,
    )

  def take_train_rows(self, start: int, stop: int) -> Dataset:
    """Only rows [start, stop) of the training split (one process's shard);
    ``mean``/``std`` are of these rows (a run combines them across processes)."""
    x, y = self.train_images[start:stop], self.train_labels[start:stop]
    mean, std = data_lib.compute_channel_stats(*data_lib.compute_channel_sums(x))
    return self._replace(train_images=x, train_labels=y, mean=mean, std=std)

  def compute_digest(self) -> str:
    """A content digest (sha256, 16 hex digits) of every split's arrays and num_classes."""
    h = hashlib.sha256(f"{self.num_classes}".encode())
    for split in ("train", "validation", "test"):
      for array in (getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")):
        array = np.ascontiguousarray(array)
        h.update(f"{split}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.data)
    return h.hexdigest()[:16]

  def describe_shapes(self) -> str:
    """'train (1437, 8, 8, 1) uint8, validation (0, 8, 8, 1), test (360, 8, 8, 1); 10 classes'."""
    return (
      f"train {self.train_images.shape} {self.train_images.dtype}, "
      f"validation {self.validation_images.shape}, test {self.test_images.shape}; "
      f"{self.num_classes} classes"
    )


def compute_held_out_rows(num_rows: int, validation_size: int, train_size: int, name: str):
  """(training rows, validation rows) of a training split of ``num_rows`` examples, both
  sorted: the validation rows are the last ``validation_size`` of a fixed seed-0
  permutation (the same whatever the run's seed), the training rows its first
  ``train_size`` (0: all the others), so the two never meet. Streamed runs read the same."""
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


def _empty_like(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((0, *x.shape[1:]), x.dtype), np.zeros((0,), np.int32)


def _check_pair(split: str, pair) -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` of one split as numpy arrays, or a ValueError naming the split."""
  if not isinstance(pair, tuple | list) or len(pair) != 2:
    raise ValueError(f"the {split} split must be a pair (x, y), got {type(pair).__name__}")
  x, y = np.asarray(pair[0]), np.asarray(pair[1])
  if x.ndim < 2:
    raise ValueError(
      f"{split} x must have a leading example axis and at least one more ([n, H, W, C] images "
      f"or [n, F] features), got shape {x.shape}"
    )
  if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
    raise ValueError(f"{split} x must be real numbers, got dtype {x.dtype}")
  if y.ndim != 1:
    raise ValueError(f"{split} y must be labels of shape [n], got shape {y.shape}")
  if len(x) != len(y):
    raise ValueError(
      f"{split} x and y differ in length: {len(x)} examples in x, {len(y)} labels in y"
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{split} y must be integer class labels, got dtype {y.dtype}")
  if len(y) and y.min() < 0:
    raise ValueError(f"{split} y has a negative label ({y.min()}); labels are 0..num_classes-1")
  return x, y


def _create(name, train, validation, test, num_classes, augment) -> Dataset:
  """The checked ``Dataset`` of three ``(x, y)`` splits (every constructor ends here)."""
  splits = ("train", "validation", "test")
  pairs = {s: _check_pair(s, p) for s, p in zip(splits, (train, validation, test), strict=True)}
  for split in ("train", "test"):
    if not len(pairs[split][1]):
      raise ValueError(f"the {split} split of {name!r} is empty")
  shape = pairs["train"][0].shape[1:]
  for split, (x, _) in pairs.items():
    if x.shape[1:] != shape:
      raise ValueError(f"{split} inputs have shape {x.shape[1:]} per example, train inputs {shape}")
  largest = max(int(y.max()) for _, y in pairs.values() if len(y))
  if num_classes is None:
    num_classes = largest + 1
  if not isinstance(num_classes, int | np.integer) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  for split, (_, y) in pairs.items():
    if len(y) and y.max() >= num_classes:
      raise ValueError(
        f"{split} labels go up to {y.max()}, but num_classes={num_classes} (the model's "
        f"logits): labels must be in [0, {num_classes})"
      )
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
  if augment == "crop_flip" and len(shape) != 3:
    raise ValueError(
      f"augment='crop_flip' crops and flips images [n, H, W, C]; inputs of {name!r} are "
      f"[n, {', '.join(map(str, shape))}]"
    )
  x_tr = pairs["train"][0]
  mean, std = data_lib.compute_channel_stats(*data_lib.compute_channel_sums(x_tr))
  arrays = [a for s in splits for a in (pairs[s][0], pairs[s][1].astype(np.int32))]
  return Dataset(name, *arrays, int(num_classes), mean, std, augment)


def check_num_logits(dataset: Dataset, num_logits: int) -> None:
  """Raises ValueError if a label of ``dataset`` is not below ``num_logits``, the
  model's outputs (cross-entropy would read past the logits)."""
  for split in ("train", "validation", "test"):
    labels = getattr(dataset, f"{split}_labels")
    if len(labels) and int(labels.max()) >= num_logits:
      raise ValueError(
        f"{split} labels of {dataset.name!r} go up to {int(labels.max())}, but the model "
        f"outputs {num_logits} logits (labels must be in [0, {num_logits}))"
      )


def check_config_dataset(d: ml_collections.ConfigDict) -> None:
  """Raises ValueError if ``config.dataset`` does not name a usable dataset, reading
  only metadata (a run checks this before it writes anything)."""
  if d.digest:
    raise ValueError(
      f"this config records in-memory arrays {d.name!r} ({d.shapes}; digest {d.digest}), "
      "not a dataset it can load: pass the same swamp_jax.Dataset as dataset="
    )
  if d.name == DIGITS:
    if (d.train_split, d.test_split) != ("train", "test"):
      raise ValueError(
        "the embedded 'digits' has the splits 'train' and 'test'; got dataset.train_split="
        f"{d.train_split!r}, dataset.test_split={d.test_split!r}"
      )
    return
  # A streamed run (not 'device') takes inputs of varying shape: it crops them on the host.
  builder = tfds_source.create_builder(
    d.name, d.data_dir, d.image_key, d.label_key, fixed_shape=d.pipeline == "device"
  )
  tfds_source.check_splits(d.name, builder, d.train_split, d.test_split)


def count_train_examples(d: ml_collections.ConfigDict) -> int:
  """Size of ``config.dataset``'s training split, without reading it."""
  if d.name == DIGITS:
    return len(Dataset.from_digits(cache_dir=d.cache_dir or None).train_labels)
  builder = tfds_source.create_builder(d.name, d.data_dir, d.image_key, d.label_key)
  return int(builder.info.splits[d.train_split].num_examples)


def record_dataset(config, dataset: Dataset) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose dataset fields record the in-memory ``dataset``:
  its name, shapes and content digest (so a resume with other arrays is refused)."""
  if not isinstance(dataset, Dataset):
    raise TypeError(
      "dataset must be a swamp_jax.Dataset (Dataset.from_arrays, Dataset.from_tfds), got "
      f"{type(dataset).__name__}"
    )
  config = config.copy_and_resolve_references()
  config.dataset.name = dataset.name
  config.dataset.digest = dataset.compute_digest()
  config.dataset.shapes = dataset.describe_shapes()
  return config


def load_dataset(config, dataset: Dataset | None = None, train_rows=None) -> Dataset:
  """The arrays a run of ``config`` trains on: the one path of runs and analyses.

  Args:
    config: a run config; ``config.dataset`` names the dataset unless
      ``dataset`` is given. ``validation_size`` and ``train_size`` apply to both.
    dataset: an in-memory ``Dataset`` replacing ``config.dataset``'s source.
      If the config records a digest (a run trained on in-memory arrays, as
      its config.json says), ``dataset`` is required and must match it.
    train_rows: (start, stop): only these rows of the training split (one
      process's shard; then validation_size and train_size must be 0).

  Returns:
    A ``Dataset``.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"load_dataset takes a run config, got {type(config).__name__}")
  d = config.dataset
  if dataset is None:
    check_config_dataset(d)
  elif not d.digest:
    raise ValueError(
      f"this run trained on the dataset its config names ({d.name!r}), loaded from the "
      "config; dataset= is only for runs trained on in-memory arrays"
    )
  elif dataset.compute_digest() != d.digest:
    raise ValueError(
      f"dataset= differs from the arrays the run trained on: digest {dataset.compute_digest()} "
      f"({dataset.describe_shapes()}) given, {d.digest} ({d.shapes}) recorded"
    )
  if train_rows is not None and (d.validation_size or d.train_size):
    raise ValueError(
      "dataset.validation_size and dataset.train_size must be 0 when each process reads only "
      "its shard of the training set"
    )
  if dataset is not None:
    source = dataset if train_rows is None else dataset.take_train_rows(*train_rows)
  elif d.name == DIGITS:
    source = Dataset.from_digits(cache_dir=d.cache_dir or None)
    source = source if train_rows is None else source.take_train_rows(*train_rows)
  else:
    source = Dataset.from_tfds(
      d.name,
      d.data_dir,
      d.train_split,
      d.test_split,
      d.image_key,
      d.label_key,
      cache_dir=d.cache_dir or None,
      train_rows=train_rows,
    )
  return source.hold_out(d.validation_size, d.train_size)


def resolve_augment(config, dataset: Dataset) -> str:
  """``config.dataset.augment``, with 'auto' meaning the dataset's own default."""
  choice = config.dataset.augment
  augment = dataset.augment if choice == "auto" else choice
  if augment == "crop_flip" and len(dataset.image_shape) != 3:
    raise ValueError(
      f"dataset.augment='crop_flip' crops and flips images [n, H, W, C]; inputs of "
      f"{dataset.name!r} are [n, {', '.join(map(str, dataset.image_shape))}]"
    )
  return augment
