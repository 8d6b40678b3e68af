import numpy as np
import pytest

from swamp_jax import datasets


def _rows(images):
  return {row.tobytes() for row in images.reshape(len(images), -1)}


def test_train_subset_is_fixed_and_never_meets_the_validation_split():
  digits = datasets.Dataset.from_digits()
  full = digits.hold_out(validation_size=200)
  subset = digits.hold_out(validation_size=200, train_size=500)
  again = datasets.Dataset.from_digits().hold_out(validation_size=200, train_size=500)
  assert len(subset.train_labels) == 500
  np.testing.assert_array_equal(subset.train_images, again.train_images)
  # The validation split does not move when a subset is taken, and the two never share a row.
  np.testing.assert_array_equal(subset.validation_images, full.validation_images)
  assert _rows(subset.train_images) <= _rows(full.train_images)
  assert not _rows(subset.train_images) & _rows(subset.validation_images)
  # Normalization statistics are those of the rows trained on.
  np.testing.assert_allclose(subset.mean, subset.train_images.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_train_subset_larger_than_what_validation_leaves_is_refused():
  digits = datasets.Dataset.from_digits()
  n = len(digits.train_labels)
  with pytest.raises(ValueError, match=f"train_size must be in \\[0, {n - 100}\\]"):
    digits.hold_out(validation_size=100, train_size=n - 99)
