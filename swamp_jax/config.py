"""The run configuration: defaults, and validation with errors that name the field.

Configs are ``ml_collections.ConfigDict``; the files in ``configs/`` start
from ``get_default_config()`` and change fields. ``validate_config`` checks
a config against these defaults (so a typo'd field is caught even in a
config built by hand) and every value against its range.
"""

from __future__ import annotations

import difflib
import fractions
import math
import os

import ml_collections
from ml_collections import config_dict

from swamp_jax import masking, optimizers, precision
from swamp_jax.datasets import AUGMENTATIONS


def get_default_config() -> ml_collections.ConfigDict:
  """SWAMP's defaults (../shared/SWAMP.md), on the embedded digits data."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"  # 'digits' (embedded) or any TFDS classification name
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS default
  # Decoded arrays (TFDS, digits); "" disables. $SWAMP_JAX_CACHE_DIR moves the default (a
  # node's local disk; the test suite's own folder, so it never writes to ~/.cache).
  c.dataset.cache_dir = os.environ.get("SWAMP_JAX_CACHE_DIR", "~/.cache/swamp_jax")
  c.dataset.train_split = "train"  # the TFDS split trained on
  c.dataset.test_split = "test"  # the TFDS split reported (e.g. 'validation' for imagenet_resized)
  c.dataset.image_key = "image"  # the TFDS feature holding the input
  c.dataset.label_key = "label"  # the TFDS feature holding the label (a ClassLabel)
  c.dataset.validation_size = 0  # held out of train, for choices; test is reported
  c.dataset.train_size = 0  # train on a fixed subset of this size (a CPU budget); 0: all
  c.dataset.augment = "auto"  # 'none', 'crop_flip'; 'auto': the dataset's (CIFAR: crop_flip)
  # Set by run(dataset=...) for in-memory arrays (config.json records what was trained on, so
  # a resume with other arrays is refused); '' for a dataset the fields above load.
  c.dataset.digest = ""
  c.dataset.shapes = ""
  # 'device': the training set in device memory; 'stream': read by grain from the host
  # (streaming.py); 'auto': 'device' while it takes <= 1/4 of a device's memory.
  c.dataset.pipeline = "auto"
  c.dataset.stream_workers = 0  # grain worker processes decoding a stream; 0: in-process

  c.model = ml_collections.ConfigDict()
  c.model.name = "lenet5"
  c.model.conv_impl = "auto"  # 'auto' (im2col on CPU, XLA conv elsewhere), 'xla', 'im2col'
  c.model.bn_momentum = 0.9
  # Compute dtype: 'bfloat16' computes forward and backward passes in bf16 while params,
  # optimizer state, SWA means, averages, masks, BN statistics and losses stay float32.
  c.model.dtype = "float32"
  # Keyword arguments of the model's factory (swamp_jax.register_model), any names: a
  # registered model's own hyperparameters live here, in the config, so that saved runs
  # and analyses rebuild exactly the trained model from config.json. conv_impl and
  # bn_momentum above are passed too, to factories that take arguments of those names.
  c.model.options = ml_collections.ConfigDict()

  c.num_particles = 4  # N; 1 gives IMP / IMP+SWA
  c.single_particle_rounds = 0  # SWAMP+: rounds r < this train one particle
  c.prune_fraction = 0.2  # of the surviving prunable weights, per round
  c.num_rounds = 10  # prunes; trains num_rounds + 1 times (round 0 is dense)
  c.prune_exclude = ()  # regexes over param paths kept dense (e.g. 'Conv_0')
  c.prune_leaves = ("kernel",)  # prunable leaf names; add 'embedding' for nn.Embed tables
  c.prune_scope = "global"  # 'global': one threshold over all; 'layerwise': same fraction per leaf
  c.prune_criterion = "magnitude"  # 'magnitude' (|w|) or 'random' (lottery-ticket baseline)

  c.rewind_epochs = 1  # T0: dense training before the ticket is taken
  c.epochs_per_round = 10  # T - T0: each round trains the ticket this long
  c.batch_size = 128
  # Epochs per compiled call (one lax.scan); the host syncs and the progress bar moves
  # between calls. >= epochs_per_round makes each round one compiled loop.
  c.epochs_per_call = 1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # 'sgd', 'adamw', 'adam'; or pass optimizer= to run()
  c.optimizer.learning_rate = 0.1  # peak
  c.optimizer.final_learning_rate = 0.0  # end of the cosine when SWA is off
  # Linear warm-up over the first warmup_epochs (may be fractional) of the dense phase and of
  # every round (it restarts at each rewind; optimizers.create_learning_rate_schedule). 0: none.
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999

  c.swa = ml_collections.ConfigDict()
  c.swa.enabled = True
  # SWA phase: from epoch s = floor(start * epochs_per_round) of the round (exact decimal
  # arithmetic: 0.75 * 10 -> 7), at the constant swa.learning_rate; the weights at the ends of
  # epochs s + every, s + 2 * every, ... are averaged: (E - s) // every snapshots, e.g.
  # E=200 -> epochs 151..200 (50), E=10 -> 8..10 (3), E=4 -> 4 (1).
  c.swa.start = 0.75  # fraction of the round
  c.swa.learning_rate = 0.05  # constant during the SWA phase
  c.swa.every_epochs = 1

  c.bn_recompute = ml_collections.ConfigDict()
  # Recompute BN statistics of averaged solutions (a particle's SWA mean of several
  # snapshots, the mean of several particles); a solution that averages nothing (IMP's last
  # weights) keeps its running statistics, as plain IMP does. Both numbers are reported.
  c.bn_recompute.enabled = True
  c.bn_recompute.unaveraged = False  # also recompute for solutions that average nothing
  c.bn_recompute.num_batches = 0  # <= 0: one full epoch

  c.mesh = ml_collections.ConfigDict()
  c.mesh.particle_axis = 0  # devices along 'particle'; 0: largest that divides N and devices
  c.mesh.data_axis = 0  # devices along 'data' (each particle's batch); 0: the rest

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # also at every round's end; 0: round ends only
  c.checkpoint.keep = 3  # newest checkpoints kept (at least 2)

  c.save_particles = True  # also save each particle's solution per round (for analyses)
  c.eval_batch_size = 1000
  c.progress = True  # progress bar on the terminal
  c.overwrite = False  # allow a workdir that holds a finished run
  return c


def get_paper_config(dataset: str, model: str) -> ml_collections.ConfigDict:
  """The CIFAR settings of the paper's experiments (for configs/cifar*.py).

  Epochs per round and the rewind point are our defaults (the paper's code is
  not public); SWA runs at a constant lr 0.05 from 75% of each round, as in
  the paper. 13 prunes: 1 - 0.8^13 = 94.5% sparsity.
  """
  c = get_default_config()
  c.dataset.name = dataset
  c.model.name = model
  c.model.conv_impl = "auto"  # XLA conv on GPU/TPU
  c.num_particles = 4
  c.num_rounds = 13
  c.rewind_epochs = 5
  c.epochs_per_round = 200
  c.batch_size = 128
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.swa.learning_rate = 0.05
  c.swa.start = 0.75
  c.eval_batch_size = 1000
  return c


def _type_error(name: str, value, default) -> str | None:
  """Why ``value`` cannot stand where ``default`` is, or None if it can."""
  if default is None or value is None:
    return None  # placeholders (e.g. dataset.data_dir) are checked where used
  if isinstance(default, bool):
    ok, kind = isinstance(value, bool), "True or False"
  elif isinstance(default, int):
    ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
  elif isinstance(default, float):
    ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
  elif isinstance(default, str):
    ok, kind = isinstance(value, str), "a string"
  elif isinstance(default, tuple):
    ok, kind = isinstance(value, tuple | list), "a tuple"
  else:
    return None
  return None if ok else f"config field {name!r} must be {kind}, got {value!r}"


def suggest_field(prefix: str, key: str, known) -> str:
  """The hint for an unknown field ``prefix + key``: the closest ``known`` name, or ''."""
  close = difflib.get_close_matches(key, list(known), n=1)
  return f"; did you mean {prefix + close[0]!r}?" if close else ""


# Groups whose fields are the user's (a model factory's keyword arguments): not checked here.
FREE_GROUPS = ("model.options",)


def _check_fields(config, defaults, prefix=""):
  for key in config:
    if prefix + key in FREE_GROUPS:
      if not isinstance(config[key], ml_collections.ConfigDict | dict):
        raise ValueError(f"config field {prefix + key!r} must be a group of fields (a dict)")
      continue
    if key not in defaults:
      hint = suggest_field(prefix, key, defaults.keys())
      raise ValueError(f"unknown config field {prefix + key!r}{hint}")
    value, default = config[key], defaults[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f"config field {prefix + key!r} must be a group of fields")
      _check_fields(value, default, f"{prefix}{key}.")
    else:
      problem = _type_error(prefix + key, value, default)
      _require(problem is None, problem)
  for key in defaults:
    if key not in config:
      kind = "group" if isinstance(defaults[key], ml_collections.ConfigDict) else "field"
      raise ValueError(
        f"the config lacks the {kind} {prefix + key!r}; build configs from "
        "swamp_jax.get_default_config() and change its fields"
      )


def _require(ok: bool, message: str):
  if not ok:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field that is unknown or out of range.

  Model and dataset names are checked where they are resolved (they need
  imports or TFDS), before any training.
  """
  _check_fields(config, get_default_config())
  _require(
    isinstance(config.num_particles, int) and config.num_particles >= 1,
    f"num_particles must be an integer >= 1, got {config.num_particles!r}",
  )
  _require(
    0.0 <= config.model.bn_momentum < 1.0,
    f"model.bn_momentum must be in [0, 1), got {config.model.bn_momentum!r}",
  )
  _require(
    config.model.dtype in precision.COMPUTE_DTYPES,
    f"model.dtype must be one of {precision.COMPUTE_DTYPES}, got {config.model.dtype!r}",
  )
  _require(
    0.0 < config.prune_fraction < 1.0,
    f"prune_fraction must be in (0, 1), got {config.prune_fraction!r}",
  )
  masking.as_fraction(config.prune_fraction)  # its message names prune_fraction
  _require(
    config.prune_scope in masking.SCOPES,
    f"prune_scope must be one of {masking.SCOPES}, got {config.prune_scope!r}",
  )
  _require(
    config.prune_criterion in masking.CRITERIA,
    f"prune_criterion must be one of {masking.CRITERIA}, got {config.prune_criterion!r}",
  )
  leaves = config.prune_leaves
  _require(
    isinstance(leaves, tuple | list)
    and len(leaves) > 0
    and all(isinstance(n, str) and n for n in leaves),
    f"prune_leaves must be a non-empty tuple of leaf names (e.g. ('kernel', 'embedding')), "
    f"got {leaves!r}",
  )
  _require(config.num_rounds >= 0, f"num_rounds must be >= 0, got {config.num_rounds!r}")
  _require(
    0 <= config.single_particle_rounds <= config.num_rounds + 1,
    f"single_particle_rounds must be in [0, num_rounds + 1 = {config.num_rounds + 1}], "
    f"got {config.single_particle_rounds!r}",
  )
  _require(config.rewind_epochs >= 0, f"rewind_epochs must be >= 0, got {config.rewind_epochs!r}")
  _require(
    config.epochs_per_round >= 1, f"epochs_per_round must be >= 1, got {config.epochs_per_round!r}"
  )
  _require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size!r}")
  _require(
    config.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {config.eval_batch_size!r}"
  )
  _require(
    config.epochs_per_call >= 1, f"epochs_per_call must be >= 1, got {config.epochs_per_call!r}"
  )
  _require(
    config.checkpoint.every_steps >= 0,
    f"checkpoint.every_steps must be >= 0, got {config.checkpoint.every_steps!r}",
  )
  _require(
    config.optimizer.name in optimizers.OPTIMIZER_NAMES,
    f"optimizer.name must be one of {optimizers.OPTIMIZER_NAMES}, got {config.optimizer.name!r}",
  )
  _require(
    config.optimizer.learning_rate > 0,
    f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate!r}",
  )
  augment = config.dataset.augment
  renamed = {"yes": "crop_flip", "no": "none"}.get(augment)
  _require(
    0 <= config.optimizer.warmup_epochs <= config.epochs_per_round,
    f"optimizer.warmup_epochs must be in [0, epochs_per_round={config.epochs_per_round}], "
    f"got {config.optimizer.warmup_epochs!r}",
  )
  _require(
    augment in ("auto", *AUGMENTATIONS),
    f"dataset.augment must be 'auto' or one of {AUGMENTATIONS}, got {augment!r}"
    + (f" (now called {renamed!r})" if renamed else ""),
  )
  for field in ("train_split", "test_split", "image_key", "label_key"):
    _require(bool(config.dataset[field]), f"dataset.{field} must be a non-empty string, got ''")
  _require(
    config.dataset.pipeline in ("auto", "device", "stream"),
    f"dataset.pipeline must be 'auto', 'device' or 'stream', got {config.dataset.pipeline!r}",
  )
  _require(
    config.dataset.stream_workers >= 0,
    f"dataset.stream_workers must be >= 0, got {config.dataset.stream_workers!r}",
  )
  if config.swa.enabled:
    _require(
      0.0 <= config.swa.start <= 1.0,
      f"swa.start must be a fraction of the round in [0, 1], got {config.swa.start!r} "
      "(past 1 the SWA phase would start after the round ends)",
    )
    _require(
      config.swa.every_epochs >= 1,
      f"swa.every_epochs must be >= 1, got {config.swa.every_epochs!r}",
    )
    _require(
      config.swa.learning_rate > 0,
      f"swa.learning_rate must be > 0, got {config.swa.learning_rate!r}",
    )
    _require(
      count_swa_snapshots(config) >= 1,
      f"swa.start={config.swa.start!r} and swa.every_epochs={config.swa.every_epochs!r} leave "
      f"no epoch end to average in a round of epochs_per_round={config.epochs_per_round!r} "
      f"(the SWA phase starts after epoch {swa_start_epoch(config)}); lower swa.start or "
      "swa.every_epochs, or set swa.enabled=False",
    )


def num_particles_in_round(config, round_index: int) -> int:
  """SWAMP+ trains one particle in the first ``single_particle_rounds`` rounds."""
  return 1 if round_index < config.single_particle_rounds else config.num_particles


def swa_start_epoch(config) -> int:
  """Epoch s of the round (counted from T0) at whose end the SWA phase starts.

  ``floor(swa.start * epochs_per_round)`` in exact decimal arithmetic (the
  float 0.29 * 100 is 28.999..., but the user wrote 29%): the learning rate
  reaches the SWA rate at the end of epoch s, and the ends of the epochs
  after it are collected (``swa.should_collect``).
  """
  start = fractions.Fraction(str(config.swa.start))
  return math.floor(start * config.epochs_per_round)


def warmup_steps(config, steps_per_epoch: int) -> int:
  """Steps of ``optimizer.warmup_epochs``: floor(warmup_epochs * steps_per_epoch), in exact
  decimal arithmetic as ``swa_start_epoch``."""
  warmup = fractions.Fraction(str(config.optimizer.warmup_epochs))
  return math.floor(warmup * steps_per_epoch)


def count_swa_snapshots(config) -> int:
  """How many weights each particle's SWA mean averages in a round: (E - s) // every."""
  if not config.swa.enabled:
    return 0
  return (config.epochs_per_round - swa_start_epoch(config)) // config.swa.every_epochs
