import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swamp_jax
from swamp_jax import datasets, imp, masking, models, results

from . import equivalence
from .conftest import REPO, run_python_on_fake_devices


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_end_to_end_on_digits_writes_everything(tiny_config, tmp_path):
  tiny_config.model.name = "lenet5"
  out = swamp_jax.run(tiny_config, str(tmp_path))
  assert [r.round for r in out.rounds] == [0, 1, 2]
  total = out.rounds[0].prunable
  for r in out.rounds:
    assert r.remaining == masking.expected_surviving(total, 0.2, r.round)
    assert len(r.particle_test_accuracy) == 2
    assert r.test_accuracy > 0.5  # 10 classes: far above chance after a few epochs
  assert [round(r.sparsity, 2) for r in out.rounds] == [0.0, 0.2, 0.36]
  # One JSON line per round, equal to what run returned.
  assert results.read_results(str(tmp_path)) == out.rounds
  assert (tmp_path / results.PLOT_FILE).stat().st_size > 1000
  r2 = swamp_jax.load_round_model(str(tmp_path), 2)
  assert r2["particle_params"]["conv1"]["kernel"].shape[0] == 2
  for a, b in zip(_leaves(r2["params"]), _leaves(out.params), strict=True):
    np.testing.assert_array_equal(a, b)
  saved = swamp_jax.load_final_model(str(tmp_path / "final_model"))
  for a, b in zip(_leaves(saved["params"]), _leaves(out.params), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(saved["mask"]), _leaves(out.mask), strict=True):
    np.testing.assert_array_equal(a, b)
  for p, m in zip(_leaves(out.params), _leaves(out.mask), strict=True):
    assert np.all(p[~m] == 0)
  kept = sum(
    int(m.sum())
    for m, pr in zip(
      _leaves(out.mask),
      jax.tree_util.tree_leaves(masking.compute_prunable(out.params)),
      strict=True,
    )
    if pr
  )
  assert kept == out.final.remaining


def test_finished_workdir_is_refused_and_nothing_is_lost(tiny_config, tmp_path):
  tiny_config.num_rounds = 0
  tiny_config.epochs_per_round = 1
  swamp_jax.run(tiny_config, str(tmp_path))
  before = (tmp_path / results.RESULTS_FILE).read_bytes()
  with pytest.raises(FileExistsError, match="already holds a finished run"):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert (tmp_path / results.RESULTS_FILE).read_bytes() == before
  assert (tmp_path / "final_model").is_dir()
  tiny_config.overwrite = True
  swamp_jax.run(tiny_config, str(tmp_path))
  assert len(results.read_results(str(tmp_path))) == 1


def _hand_written_imp(config):
  """Plain IMP (one network, no SWA) in a Python loop of jitted steps, numpy pruning."""
  ds = datasets.load_dataset(config)
  model = models.create_model(config.model.name, ds.num_classes, "xla")
  x_train = (ds.train_images.astype(np.float32) - ds.mean) / ds.std
  x_test = (ds.test_images.astype(np.float32) - ds.mean) / ds.std
  n, bsz = len(ds.train_labels), config.batch_size
  spe = n // bsz
  t0, t_end = config.rewind_epochs * spe, (config.rewind_epochs + config.epochs_per_round) * spe
  schedule = optax.cosine_decay_schedule(config.optimizer.learning_rate, t_end)
  params = model.init(imp.init_key(config.seed), jnp.zeros((1, 8, 8, 1)), train=False)["params"]

  def make_tx(offset):
    return optax.chain(
      optax.add_decayed_weights(config.optimizer.weight_decay),
      optax.sgd(lambda c: schedule(c + offset), momentum=0.9, nesterov=True),
    )

  def train(params, mask, key, first, last, tx):
    @jax.jit
    def step(params, opt_state, x, y):
      def loss_fn(p):
        logits = model.apply({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      grads = jax.tree_util.tree_map(lambda g, m: g * m, jax.grad(loss_fn)(params), mask)
      updates, opt_state = tx.update(grads, opt_state, params)
      updates = jax.tree_util.tree_map(lambda u, m: u * m, updates, mask)
      return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for t in range(first, last):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, t // spe), n))
      idx = perm[(t % spe) * bsz : (t % spe + 1) * bsz]
      params, opt_state = step(params, opt_state, x_train[idx], ds.train_labels[idx])
    return params

  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  ticket = train(params, ones, imp.pretrain_key(config.seed), 0, t0, make_tx(0))
  mask = {
    k: {"kernel": np.ones(v["kernel"].shape, bool), "bias": np.ones(v["bias"].shape, bool)}
    for k, v in ticket.items()
  }
  accuracies, masks, finals, all_logits = [], [], [], []
  for r in range(config.num_rounds + 1):
    start = jax.tree_util.tree_map(lambda w, m: w * m, ticket, mask)
    final = train(start, mask, imp.particle_key(config.seed, r, 0), t0, t_end, make_tx(t0))
    finals.append(final)
    logits = model.apply({"params": final}, x_test, train=False)
    accuracies.append(float(np.mean(np.argmax(logits, -1) == ds.test_labels)))
    all_logits.append(np.asarray(logits))
    masks.append(mask)
    names = sorted(final)  # the flattening order of the param dict
    scores = np.concatenate(
      [np.where(mask[k]["kernel"], np.abs(final[k]["kernel"]), -1).ravel() for k in names]
    )
    alive = int(np.sum(scores >= 0))
    remove = (scores.size - alive) + int(np.round(np.float32(0.2) * np.float32(alive)))
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, kind="stable")[:remove]] = False
    offset, mask = 0, {}
    for k in names:
      size = final[k]["kernel"].size
      mask[k] = {
        "kernel": keep[offset : offset + size].reshape(final[k]["kernel"].shape),
        "bias": np.ones(final[k]["bias"].shape, bool),
      }
      offset += size
  # The last mask was pruned from the round before the last.
  return final, masks[-1], accuracies, finals[-2], all_logits


def test_imp_through_run_equals_a_hand_written_imp_loop(tiny_config):
  tiny_config.num_particles = 1
  tiny_config.swa.enabled = False
  tiny_config.model.conv_impl = "xla"
  out = swamp_jax.run(tiny_config)
  params, mask, accuracies, pruned_from, logits = _hand_written_imp(tiny_config)
  # Two programs (scanned steps and prune in one jit, vs a loop of jitted steps and numpy
  # pruning) reduce in different orders: 7 epochs of 11 steps of LeNet-300-100 (3 layers
  # forward and backward; sums of at most 300 terms) on digits, see tests/equivalence.py.
  rtol = equivalence.training_rtol(7 * 11, 300, depth=2 * 3)
  for k in params:
    equivalence.assert_close_normwise(out.params[k]["kernel"], params[k]["kernel"], rtol, k)
  equivalence.assert_masks_agree_except_near_the_threshold(
    {k: out.mask[k]["kernel"] for k in mask},
    {k: mask[k]["kernel"] for k in mask},
    {k: pruned_from[k]["kernel"] for k in mask},
    rtol,
  )
  for r, accuracy in enumerate(accuracies):
    equivalence.assert_accuracies_agree(out.rounds[r].test_accuracy, accuracy, logits[r], 3 * rtol)


def test_swamp_plus_trains_one_particle_in_early_rounds(tiny_config):
  tiny_config.num_rounds = 1
  tiny_config.epochs_per_round = 1
  tiny_config.single_particle_rounds = 1
  out = swamp_jax.run(tiny_config)
  assert [r.num_particles for r in out.rounds] == [1, 2]


def test_custom_optax_transform_through_run_keeps_pruned_weights_zero(tiny_config):
  tiny_config.num_rounds = 1
  tiny_config.epochs_per_round = 1
  out = swamp_jax.run(
    tiny_config,
    optimizer=lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)),
  )
  assert out.final.sparsity == pytest.approx(0.2, abs=1e-4)
  for p, m in zip(_leaves(out.params), _leaves(out.mask), strict=True):
    assert np.all(p[~m] == 0)


BAD_INPUTS = [
  ("model.name", "resnet_9000", ValueError, "resnet_9000"),
  ("dataset.name", "no_such_dataset_xyz", ValueError, "no_such_dataset_xyz"),
  ("prune_fraction", 0.0, ValueError, "prune_fraction"),
  ("prune_fraction", 1.0, ValueError, "prune_fraction"),
  ("num_particles", 0, ValueError, "num_particles"),
  ("swa.start", 1.5, ValueError, "swa.start"),
  ("swa.start", 1.0, ValueError, "no epoch end to average"),
  ("model.conv_impl", "fft", ValueError, "fft"),
  ("dataset.train_size", 10**6, ValueError, "train_size"),
  ("num_particles", True, ValueError, "num_particles' must be an integer, got True"),
  ("model.bn_momentum", 2.0, ValueError, r"bn_momentum must be in \[0, 1\)"),
  ("mesh.data_axis", 3, ValueError, "data_axis=3 needs at least 3 devices, but 1 are"),
  ("model.dtype", "float16", ValueError, "model.dtype must be one of"),
  ("optimizer.warmup_epochs", -1, ValueError, r"warmup_epochs must be in \[0, epochs_per_round"),
  ("optimizer.warmup_epochs", 3, ValueError, r"warmup_epochs must be in \[0, epochs_per_round=2"),
]


@pytest.mark.parametrize(("field", "value", "error", "message"), BAD_INPUTS)
def test_bad_input_raises_a_clear_error(tiny_config, tmp_path, field, value, error, message):
  group, _, name = field.rpartition(".")
  (tiny_config[group] if group else tiny_config)[name] = value
  with pytest.raises(error, match=message):
    swamp_jax.run(tiny_config, str(tmp_path))
  assert not (tmp_path / results.RESULTS_FILE).exists()


def test_typo_in_config_field_is_named(tiny_config):
  tiny_config.num_particle = 4
  with pytest.raises(ValueError, match="unknown config field 'num_particle'.*'num_particles'"):
    swamp_jax.run(tiny_config)


def test_cli_rejects_a_typod_field_with_its_name(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "swamp_jax",
      "--config",
      "configs/digits.py",
      "--workdir",
      str(tmp_path),
      "--config.num_particle=2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  assert "num_particle" in proc.stderr


def test_every_shipped_config_is_valid():
  import importlib.util

  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    swamp_jax.validate_config(config)
    models.create_model(config.model.name, 10)
    assert "python -m swamp_jax --config configs/" + path.name in module.__doc__
    json.loads(config.to_json_best_effort())


def test_a_config_missing_a_group_is_named(tiny_config):
  del tiny_config["mesh"]
  with pytest.raises(ValueError, match="lacks the group 'mesh'.*get_default_config"):
    swamp_jax.run(tiny_config)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("dataset.name", "no_such_dataset_xyz", "unknown dataset"),  # found before any I/O
    ("dataset.train_size", 10**6, "train_size"),  # found once the data is read
  ],
)
def test_an_error_leaves_no_new_workdir_behind(tiny_config, tmp_path, field, value, message):
  group, _, name = field.rpartition(".")
  tiny_config[group][name] = value
  with pytest.raises(ValueError, match=message):
    swamp_jax.run(tiny_config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


def test_a_workdir_that_is_a_file_is_refused(tiny_config, tmp_path):
  (tmp_path / "file").write_text("mine")
  with pytest.raises(FileExistsError, match="is a file, not a directory"):
    swamp_jax.run(tiny_config, str(tmp_path / "file"))
  assert (tmp_path / "file").read_text() == "mine"


def test_a_dataset_without_a_test_split_is_refused_before_reading(tiny_config, tmp_path):
  from .conftest import SHARED_TFDS

  (version,) = (SHARED_TFDS / "mnist").iterdir()
  fake = tmp_path / "tfds" / "mnist" / version.name
  fake.mkdir(parents=True)  # the metadata alone: reading any example would fail
  (fake / "features.json").write_bytes((version / "features.json").read_bytes())
  info = json.loads((version / "dataset_info.json").read_text())
  info["splits"] = [s for s in info["splits"] if s["name"] != "test"]
  (fake / "dataset_info.json").write_text(json.dumps(info))
  tiny_config.dataset.name = "mnist"
  tiny_config.dataset.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"'mnist' has no 'test' split \(it has \['train'\]\)"):
    swamp_jax.run(tiny_config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


_MESH_ON_4_DEVICES = """
import logging
from swamp_jax import run_setup
from tests.conftest import create_tiny_config
logging.basicConfig(level=logging.WARNING)
try:
  run_setup.create_placement(create_tiny_config(batch_size=64, mesh__data_axis=3))
except ValueError as e:
  print("ERROR", e)
placement = run_setup.create_placement(create_tiny_config(batch_size=63, mesh__data_axis=3))
print("MESH", dict(placement.mesh.shape))
"""


def test_a_mesh_that_leaves_devices_unused_names_the_device_count():
  proc = run_python_on_fake_devices(_MESH_ON_4_DEVICES, 4)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ERROR batch_size=64 is not divisible by mesh.data_axis=3" in proc.stdout
  assert "only 3 of the 4 devices" in proc.stdout
  assert "uses 3 of the 4 devices; meshes that use them all: ['1 x 4', '2 x 2']" in proc.stderr


def _cli(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "swamp_jax", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(env or {})},
  )


def test_cli_errors_are_one_line_naming_the_cause(tmp_path):
  (tmp_path / "file").write_text("")
  digits = ["--config", "configs/digits.py"]
  cases = [
    ([*digits, f"--workdir={tmp_path}/a", "--config.foo=1"], 2, "unknown config field 'foo'"),
    (
      [*digits, f"--workdir={tmp_path}/a", "--config.model.nme=x"],
      2,
      "unknown config field 'model.nme' in --config.model.nme=x; did you mean 'model.name'?",
    ),
    (["--config", "config.py", f"--workdir={tmp_path}/a"], 2, "config file 'config.py' does not"),
    ([*digits, f"--workdir={tmp_path}/file"], 1, "is a file, not a directory"),
    ([*digits, f"--workdir={tmp_path}/a", "extra"], 2, "unexpected arguments ['extra']"),
    ([*digits, f"--workdir={tmp_path}/a", "--config.model.bn_momentum=2.0"], 1, "bn_momentum"),
  ]
  for args, status, message in cases:
    proc = _cli(*args)
    assert proc.returncode == status, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, args
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("swamp_jax: error: ") and message in last, (args, last)
  assert not (tmp_path / "a").exists()
  verbose = _cli(*digits, f"--workdir={tmp_path}/a", "--config.model.bn_momentum=2.0", "--verbose")
  traced = _cli(
    *digits,
    f"--workdir={tmp_path}/a",
    "--config.seed=-1",
    "--config.model.bn_momentum=2.0",
    env={"SWAMP_JAX_TRACEBACK": "1"},
  )
  for proc in (verbose, traced):
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "bn_momentum must be in [0, 1)" in proc.stderr
