"""Your own data: ``Dataset.from_arrays``, TFDS splits and keys, and their errors."""

import importlib.metadata
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import swamp_jax
from swamp_jax import checkpointing, datasets, saved_runs
from swamp_jax import workdir as workdir_lib

from .conftest import SHARED_TFDS, create_tiny_config


def _tiny(**overrides):
  """Two particles of LeNet-300-100, no dense pretraining, one pruning round of one epoch:
  every run here compiles the same small programs for its shapes."""
  return create_tiny_config(num_rounds=1, epochs_per_round=1, rewind_epochs=0, **overrides)


def _digits_arrays():
  d = swamp_jax.Dataset.from_digits()
  return (d.train_images, d.train_labels), (d.test_images, d.test_labels)


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def _round_dicts(result):
  return [{k: v for k, v in vars(r).items() if k != "seconds"} for r in result.rounds]


def test_digits_cached_split_is_the_same_and_loads_without_scikit_learn(tmp_path, monkeypatch):
  first = swamp_jax.Dataset.from_digits(cache_dir=str(tmp_path))
  version = importlib.metadata.version("scikit-learn")
  assert [p.name for p in tmp_path.iterdir()] == [f"digits-sklearn{version}.npz"]
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now fails
  with pytest.raises(ImportError):
    swamp_jax.Dataset.from_digits()  # uncached: needs scikit-learn
  again = swamp_jax.Dataset.from_digits(cache_dir=str(tmp_path))
  assert first._fields == again._fields
  for field, a, b in zip(first._fields, first, again, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=field)
  # A multi-process run counts the training rows before each process loads its shard: from
  # the same cache (it imported scikit-learn in every process, 1.3 s each).
  config = _tiny(dataset__cache_dir=str(tmp_path))
  assert datasets.count_train_examples(config.dataset) == len(first.train_labels)


def test_array_cache_default_follows_swamp_jax_cache_dir(monkeypatch):
  from swamp_jax.config import get_default_config

  # conftest points it at this session's folder (inherited by every subprocess), unless the
  # caller set it: the suite never writes to ~/.cache on its own.
  assert get_default_config().dataset.cache_dir == os.environ["SWAMP_JAX_CACHE_DIR"]
  monkeypatch.delenv("SWAMP_JAX_CACHE_DIR")
  assert get_default_config().dataset.cache_dir == "~/.cache/swamp_jax"
  monkeypatch.setenv("SWAMP_JAX_CACHE_DIR", "/scratch/arrays")
  assert get_default_config().dataset.cache_dir == "/scratch/arrays"


@pytest.fixture(scope="module")
def arrays_run(tmp_path_factory):
  """Digits from the config, and the same arrays through from_arrays (with a workdir)."""
  config = _tiny()
  from_config = swamp_jax.run(config)
  train, test = _digits_arrays()
  dataset = swamp_jax.Dataset.from_arrays(train=train, test=test, name="my_digits")
  workdir = str(tmp_path_factory.mktemp("arrays") / "run")
  from_arrays = swamp_jax.run(config, workdir, dataset=dataset)
  return config, dataset, workdir, from_config, from_arrays


def test_digits_as_arrays_train_bit_identically_to_the_configs_digits(arrays_run):
  config, _, _, from_config, from_arrays = arrays_run
  assert _round_dicts(from_arrays) == _round_dicts(from_config)
  for tree in ("params", "batch_stats", "mask"):
    a, b = _leaves(getattr(from_arrays, tree)), _leaves(getattr(from_config, tree))
    assert len(a) == len(b) > 0 or tree == "batch_stats"
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)
  assert config.dataset.digest == ""  # the caller's config is not changed


def test_config_json_records_the_arrays_and_a_resume_with_other_arrays_is_refused(
  arrays_run, tmp_path
):
  config, dataset, workdir, _, _ = arrays_run
  with open(f"{workdir}/{workdir_lib.CONFIG_FILE}") as f:
    written = json.load(f)["dataset"]
  assert written["name"] == "my_digits"
  assert written["digest"] == dataset.compute_digest()
  assert (
    written["shapes"]
    == "train (1437, 8, 8, 1) uint8, validation (0, 8, 8, 1), test (360, 8, 8, 1); 10 classes"
  )
  # An unfinished copy of the run (its final model removed) resumed with one label changed.
  unfinished = tmp_path / "unfinished"
  shutil.copytree(workdir, unfinished)
  shutil.rmtree(unfinished / workdir_lib.FINAL_MODEL_DIR)
  (x, y), test = _digits_arrays()
  y = y.copy()
  y[0] = (y[0] + 1) % 10
  other = swamp_jax.Dataset.from_arrays(train=(x, y), test=test, name="my_digits")
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="dataset.digest"):
    swamp_jax.run(config, str(unfinished), dataset=other)


def test_a_run_on_arrays_is_analysed_with_them_and_refused_without(arrays_run):
  _, dataset, workdir, _, from_arrays = arrays_run
  with pytest.raises(ValueError, match="in-memory arrays 'my_digits'.*pass the same"):
    saved_runs.load_run(workdir)
  with pytest.raises(ValueError, match="in-memory arrays 'my_digits'.*pass the same"):
    swamp_jax.compute_round_hessian_trace(workdir, 1, num_probes=1, num_batches=1)
  (x, y), test = _digits_arrays()
  other = swamp_jax.Dataset.from_arrays(train=(x[1:], y[1:]), test=test, name="my_digits")
  with pytest.raises(ValueError, match="dataset= differs from the arrays the run trained on"):
    saved_runs.load_run(workdir, other)
  run = saved_runs.load_run(workdir, dataset)
  np.testing.assert_array_equal(run.dataset.train_images, dataset.train_images)
  # Mask quality rebuilds the run's setup from a config: the run's own (its digest must
  # match), or a fresh one with the arrays (recorded as run() records them).
  with pytest.raises(ValueError, match="dataset= differs from the arrays the run trained on"):
    swamp_jax.compute_ticket(run.config, dataset=other)
  ticket = swamp_jax.compute_ticket(run.config, dataset=dataset)  # rewind_epochs=0: the init
  fresh = _leaves(swamp_jax.compute_ticket(_tiny(), dataset=dataset))
  assert len(fresh) == 6  # lenet300_100's kernels and biases
  for a, b in zip(_leaves(ticket), fresh, strict=True):
    np.testing.assert_array_equal(a, b)
  ensemble = swamp_jax.evaluate_ensemble_of_runs([workdir], 1, run.dataset, run.model)
  assert ensemble["member_accuracies"] == [ensemble["accuracy"]]
  # The round's averaged model, evaluated again on the test arrays: lenet300_100 has no
  # BatchNorm, so the same weights give the same argmax but through another program (a tie
  # of the two largest logits within float32 rounding could flip one example).
  assert abs(ensemble["accuracy"] - from_arrays.rounds[1].test_accuracy) <= 1 / 360


def _make_blobs(rng, n):
  """Two Gaussian classes in 20 features, 6 standard deviations apart, features in
  different units (one in thousands, one in thousandths)."""
  scale = np.array([1.0, 1000.0, 0.001, *np.ones(17)], np.float32)
  y = rng.integers(0, 2, n)
  x = rng.normal(size=(n, 20)).astype(np.float32) + 3.0 * (2 * y[:, None] - 1) / np.sqrt(20)
  return x * scale, y


def test_a_flat_feature_matrix_trains_an_mlp_with_per_feature_normalization():
  rng = np.random.default_rng(0)
  dataset = swamp_jax.Dataset.from_arrays(
    train=_make_blobs(rng, 512), test=_make_blobs(rng, 512), name="blobs"
  )
  assert dataset.num_classes == 2 and dataset.image_shape == (20,)
  normalized = (dataset.train_images - dataset.mean) / dataset.std
  np.testing.assert_allclose(normalized.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(normalized.std(0), 1.0, rtol=1e-4)
  result = swamp_jax.run(_tiny(), dataset=dataset)  # lenet300_100, 2 particles
  # The Bayes accuracy is 99.9%; garbled features (one feature in thousands swamping the
  # others without per-feature normalization) would be far from it.
  assert [r.round for r in result.rounds] == [0, 1]
  assert all(r.test_accuracy > 0.9 for r in result.rounds), result.table()
  assert result.mask["fc1"]["kernel"].shape == (20, 300)


def _fixed_getitems(*args, generator, serialized=False):
  """tfds 4.9.10's mock_data sets the data source's ``__getitems__`` to a partial of a
  function of ``(self, record_keys)`` as a plain attribute, so ``self`` is never passed and
  every batch read fails (single reads work); this reads the same fake examples."""
  assert not serialized
  return [generator[k] for k in args[-1]]


def _write_tfds_metadata(data_dir, name: str, splits):
  """A TFDS dataset's metadata alone (features.json, dataset_info.json), as
  ``tfds.builder`` reads it from files: features 'features' [20] float32, 'label' of 2."""
  import tensorflow_datasets as tfds

  folder = data_dir / name / "1.0.0"
  folder.mkdir(parents=True)
  tfds.features.FeaturesDict(
    {
      "features": tfds.features.Tensor(shape=(20,), dtype=np.float32),
      "label": tfds.features.ClassLabel(num_classes=2),
    }
  ).save_config(str(folder))
  template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  info = {
    "name": name,
    "version": "1.0.0",
    "fileFormat": "array_record",
    "moduleName": "tensorflow_datasets.core.dataset_builders.adhoc_builder",
    "splits": [
      {"name": s, "filepathTemplate": template, "numBytes": "0", "shardLengths": ["512"]}
      for s in splits
    ],
  }
  (folder / "dataset_info.json").write_text(json.dumps(info))


def test_a_tfds_dataset_whose_test_split_is_validation_runs(monkeypatch, tmp_path):
  """A TFDS dataset with 'train' and 'validation' splits (as imagenet2012) and its input
  under another key: real metadata, examples from ``tfds.testing.mock_data``."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  data_dir = tmp_path / "tfds"
  _write_tfds_metadata(data_dir, "blobs", ("train", "validation"))
  monkeypatch.setattr(mocking, "_getitems", _fixed_getitems)
  read = []
  data_source = tfds.data_source

  def record_split(name, split, **kwargs):
    read.append(split)
    return data_source(name, split=split, **kwargs)

  monkeypatch.setattr(tfds, "data_source", record_split)
  config = _tiny(dataset__name="blobs", dataset__data_dir=str(data_dir), dataset__cache_dir="")
  config.dataset.image_key = "features"
  with tfds.testing.mock_data(
    num_examples=512, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(data_dir)
  ):
    with pytest.raises(ValueError, match=r"no 'test' split \(it has \['train', 'validation'\]\)"):
      swamp_jax.run(config, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists() and not read
    config.dataset.test_split = "validation"
    result = swamp_jax.run(config)
  # (The mock generates the same examples for every split; the split read is recorded.)
  assert read == ["train", "validation"]
  assert [r.round for r in result.rounds] == [0, 1]
  assert all(r.test_accuracy * 512 == round(r.test_accuracy * 512) for r in result.rounds)


def _with(split, x=None, y=None):
  (x_tr, y_tr), test = _digits_arrays()
  pairs = {"train": (x_tr, y_tr), "test": test}
  pairs[split] = (pairs[split][0] if x is None else x, pairs[split][1] if y is None else y)
  return pairs


_BAD_ARRAYS = [
  ({**_with("train", y=np.zeros(10, np.int32))}, "train x and y differ in length: 1437 .* 10"),
  (
    _with("test", y=np.linspace(0, 9, 360)),
    "test y must be integer class labels, got dtype float64",
  ),
  (_with("train", y=-np.ones(1437, np.int64)), "train y has a negative label"),
  (
    _with("train", x=np.zeros((1437, 9, 9, 1))),
    r"test inputs have shape \(8, 8, 1\) .* \(9, 9, 1\)",
  ),
  (_with("train", x=np.zeros(1437)), "leading example axis and at least one more"),
]


@pytest.mark.parametrize(("pairs", "message"), _BAD_ARRAYS)
def test_bad_arrays_are_refused_naming_the_split(pairs, message):
  with pytest.raises(ValueError, match=message):
    swamp_jax.Dataset.from_arrays(**pairs)


def test_labels_beyond_num_classes_or_the_models_logits_are_refused(tmp_path):
  (x, y), test = _digits_arrays()
  with pytest.raises(ValueError, match=r"train labels go up to 9, but num_classes=5"):
    swamp_jax.Dataset.from_arrays(train=(x, y), test=test, num_classes=5)
  # A Dataset made by hand, past the constructor's check: the model built for its
  # num_classes has 5 logits, and labels up to 9 are refused before anything is trained.
  dataset = swamp_jax.Dataset.from_arrays(train=(x, y), test=test)._replace(num_classes=5)
  with pytest.raises(ValueError, match=r"labels of 'arrays' go up to 9, but the model outputs 5"):
    swamp_jax.run(_tiny(), str(tmp_path / "work"), dataset=dataset)
  assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
  ("fields", "message"),
  [
    (
      {"test_split": "validation"},
      r"'mnist' has no 'validation' split \(it has \['test', 'train'\]\); set dataset.test_split",
    ),
    ({"train_split": "train[:90%]+extra"}, r"no 'extra' split .* set dataset.train_split"),
    (
      {"image_key": "img"},
      r"no feature 'img' \(dataset.image_key\); its features: \['image', 'label'\]",
    ),
    ({"label_key": "digit"}, r"no feature 'digit' \(dataset.label_key\)"),
    ({"augment": "yes"}, r"dataset.augment must be .* got 'yes' \(now called 'crop_flip'\)"),
  ],
)
def test_tfds_splits_and_keys_are_checked_before_anything_is_written(fields, message, tmp_path):
  config = _tiny(dataset__name="mnist", dataset__data_dir=str(SHARED_TFDS))
  config.dataset.update(fields)
  with pytest.raises(ValueError, match=message):
    swamp_jax.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_crop_flip_on_feature_vectors_and_a_non_dataset_are_refused(tmp_path):
  (x, y), (xt, yt) = _digits_arrays()
  flat = swamp_jax.Dataset.from_arrays(train=(x.reshape(-1, 64), y), test=(xt.reshape(-1, 64), yt))
  config = _tiny(dataset__augment="crop_flip")
  with pytest.raises(ValueError, match=r"crops and flips images \[n, H, W, C\]; .* are \[n, 64\]"):
    swamp_jax.run(config, str(tmp_path / "work"), dataset=flat)
  with pytest.raises(TypeError, match="dataset must be a swamp_jax.Dataset"):
    swamp_jax.run(config, str(tmp_path / "work"), dataset=(x, y))
  assert not (tmp_path / "work").exists()


def test_auto_augmentation_is_the_datasets_own():
  config = _tiny()
  cifar_like = datasets.Dataset.from_digits()._replace(augment="crop_flip")
  assert datasets.resolve_augment(config, cifar_like) == "crop_flip"
  assert datasets.resolve_augment(config, datasets.Dataset.from_digits()) == "none"
  config.dataset.augment = "none"
  assert datasets.resolve_augment(config, cifar_like) == "none"
  assert datasets.default_augment("cifar100") == "crop_flip"
  assert datasets.default_augment("mnist") == "none"


def test_each_process_reads_only_its_rows_of_a_sliced_tfds_split_or_of_arrays():
  config = _tiny(dataset__name="mnist", dataset__data_dir=str(SHARED_TFDS), dataset__cache_dir="")
  config.dataset.train_split, config.dataset.test_split = "train[:1000]", "test[:100]"
  rows = datasets.load_dataset(config, train_rows=(200, 300))
  whole = swamp_jax.Dataset.from_tfds("mnist", str(SHARED_TFDS), "train[200:300]", "test[:100]")
  assert rows.train_images.shape == (100, 28, 28, 1)
  np.testing.assert_array_equal(rows.train_images, whole.train_images)
  np.testing.assert_array_equal(rows.train_labels, whole.train_labels)
  np.testing.assert_array_equal(rows.mean, whole.mean)  # this process's rows' statistics
  train, test = _digits_arrays()
  arrays = swamp_jax.Dataset.from_arrays(train=train, test=test)
  mine = datasets.load_dataset(datasets.record_dataset(_tiny(), arrays), arrays, (10, 20))
  np.testing.assert_array_equal(mine.train_labels, train[1][10:20])
  config.dataset.validation_size = 10
  with pytest.raises(ValueError, match="must be 0 when each process reads only its shard"):
    datasets.load_dataset(config, train_rows=(200, 300))


def test_images_that_vary_in_size_are_refused_in_device_memory_before_reading(tmp_path):
  config = _tiny(dataset__name="imagenette/160px", dataset__data_dir=str(tmp_path / "none"))
  config.dataset.test_split = "validation"
  config.dataset.pipeline = "device"  # 'auto' streams them (random-resized crops)
  with pytest.raises(ValueError, match=r"vary in shape \(None, None, 3\).*pipeline='stream'"):
    swamp_jax.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists() and not (tmp_path / "none").exists()


def test_a_checkpoint_written_before_the_dataset_fields_existed_compares_as_their_defaults():
  current = checkpointing.math_config(_tiny())
  saved = {k: v for k, v in current.items() if not k.startswith("dataset.") or k == "dataset.name"}
  assert checkpointing.compare_configs(saved, current) == []
  config = _tiny()
  config.dataset.test_split = "validation"
  assert checkpointing.compare_configs(saved, checkpointing.math_config(config)) == [
    "dataset.test_split: 'test' in the checkpoint, 'validation' now"
  ]
