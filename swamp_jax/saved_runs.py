"""A finished run as the analyses see it: its config, dataset and model, rebuilt from its workdir.

``run(config, workdir)`` writes ``config.json`` and, per round, the averaged
model, its mask and each particle's solution (``workdir_lib.load_round_model``).
Everything an analysis needs besides those weights is a function of the
config, so it is rebuilt here, in one place, rather than stored; a run
trained on in-memory arrays recorded their digest instead, and its analyses
take the same ``Dataset`` again as ``dataset=``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np

from swamp_jax import config as config_lib
from swamp_jax import datasets, run_setup
from swamp_jax import workdir as workdir_lib

SPLITS = ("train", "validation", "test")


class SavedRun(NamedTuple):
  """A run's workdir with what it was trained on."""

  workdir: str
  config: ml_collections.ConfigDict
  dataset: datasets.Dataset
  model: object  # as ``run`` built it (linen, or ``models.NnxModel`` for an NNX model)


class SplitArrays(NamedTuple):
  """One split on the device: stored inputs [n, ...], int32 labels [n]."""

  images: jnp.ndarray
  labels: jnp.ndarray


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run wrote to ``workdir/config.json``, over today's defaults.

  Starting from ``config.get_default_config()`` lets a run written before a
  field existed load with that field's default (which is what it ran with).
  """
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a swamp_jax run's workdir")
  with open(path) as f:
    written = json.load(f)
  config = config_lib.get_default_config()
  config.update(written)
  return config


@functools.lru_cache(maxsize=4)
def _load_config_dataset(dataset_fields: str) -> datasets.Dataset:
  config = config_lib.get_default_config()
  config.dataset.update(json.loads(dataset_fields))
  dataset = datasets.load_dataset(config)
  for value in dataset:
    if isinstance(value, np.ndarray):
      value.flags.writeable = False  # shared by every run that reads it
  return dataset


@functools.lru_cache(maxsize=16)
def _create_model(model_fields: str, num_classes: int):
  config = config_lib.get_default_config()
  config.model.update(json.loads(model_fields))
  return run_setup.create_config_model(config, num_classes)


def create_model_and_dataset(config, dataset=None) -> tuple[object, datasets.Dataset]:
  """The model and dataset that ``run`` builds from ``config`` (the same functions).

  A dataset the config names is cached by its config fields, and the model
  by its fields: the analyses of a sweep's runs then read the data once and
  share one model object, so jitted analysis programs (the model is a
  static argument) compile once. The dataset's arrays are read-only.

  Args:
    dataset: for a run trained on in-memory arrays (``run(...,
      dataset=...)``), the same ``Dataset`` again; it must match the digest
      the run recorded. None for a run of a dataset its config names.

  Raises:
    ValueError: the run trained on in-memory arrays and ``dataset`` is None
      or holds other arrays, or ``dataset`` is given for a config's dataset.
  """
  if dataset is None and not config.dataset.digest:
    dataset = _load_config_dataset(json.dumps(config.dataset.to_dict(), sort_keys=True))
  else:
    dataset = datasets.load_dataset(config, dataset)
  model = _create_model(json.dumps(config.model.to_dict(), sort_keys=True), dataset.num_classes)
  return model, dataset


def load_run(workdir: str, dataset=None) -> SavedRun:
  """Rebuilds the config, dataset and model of the run in ``workdir``.

  ``dataset``: the in-memory ``Dataset`` a run trained on (``run(...,
  dataset=...)``); None for a run of a dataset its config names.
  """
  config = load_config(workdir)
  try:
    model, dataset = create_model_and_dataset(config, dataset)
  except ValueError as e:
    raise ValueError(f"{workdir!r}: {e}") from e
  return SavedRun(os.path.abspath(workdir), config, dataset, model)


def get_split(dataset: datasets.Dataset, split: str) -> SplitArrays:
  """``split`` ('train', 'validation' or 'test') of ``dataset`` as device arrays."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  images = getattr(dataset, f"{split}_images")
  labels = getattr(dataset, f"{split}_labels")
  if not len(labels):
    raise ValueError(
      f"the {split!r} split of {dataset.name!r} is empty"
      + (" (set dataset.validation_size > 0 in the run's config)" if split == "validation" else "")
    )
  return SplitArrays(jnp.asarray(images), jnp.asarray(labels))
