"""Models that are not swamp_jax's: registered by name or passed to run, linen and NNX.

The models are defined here, outside the package: a tiny ViT (patch conv, BatchNorm at
momentum 0.99, LayerNorm, self-attention, a position ``Embed``) and an NNX network with
attention and BatchNorm. SWAMP trains them with N=4 particles, prunes their attention
kernels, resumes after SIGKILL, and the analyses rebuild them from the saved runs.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swamp_jax
from swamp_jax import batchnorm, checkpointing, masking, models, saved_runs

from .conftest import REPO, compute_once_per_session, create_fake_device_env, create_tiny_config


class TinyViT(nn.Module):
  """4x4 patches of 8x8 digits -> 4 tokens of ``dim``, one pre-norm transformer block."""

  num_classes: int
  dim: int = 16
  heads: int = 2
  norm_momentum: float = 0.99  # not `bn_momentum`, which config.model.bn_momentum would set

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.dim, (4, 4), strides=4, name="patch_embed")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.norm_momentum, name="bn")(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    x = x + nn.Embed(x.shape[1], self.dim, name="position")(jnp.arange(x.shape[1]))
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(nn.LayerNorm()(x))
    y = nn.Dense(2 * self.dim, name="mlp_in")(nn.LayerNorm()(x))
    x = x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(y))
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm()(x).mean(axis=1))


class NnxNet(nnx.Module):
  """Rows of an 8x8 image as 8 tokens: Linear, self-attention, BatchNorm, head."""

  def __init__(self, num_classes: int, dim: int = 8, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x, train: bool):
    x = self.embed(x.reshape(x.shape[0], 8, 8))
    x = x + self.attention(x)
    x = self.bn(x.mean(axis=1), use_running_average=not train)
    return self.head(nnx.relu(x))


swamp_jax.register_model("test_vit", TinyViT)
swamp_jax.register_model("test_nnx", NnxNet)

ATTENTION_KERNELS = ("query", "key", "value", "out")


def create_vit_config():
  """N=4, 2 rounds (dense, one prune) of 1 epoch of 2 steps from the initialization (no
  dense phase to compile), layerwise: every kernel loses 20%. A checkpoint every step (to
  be killed between two), 128 validation examples (for Lottery Pools)."""
  config = create_tiny_config(
    num_particles=4,
    num_rounds=1,
    rewind_epochs=0,
    epochs_per_round=1,
    prune_scope="layerwise",
    prune_leaves=("kernel", "embedding"),
    dataset__train_size=256,
    dataset__validation_size=128,
    checkpoint__every_steps=1,
  )
  config.model.name = "test_vit"
  config.model.options.dim = 16
  return config


def create_nnx_config():
  """As ``create_vit_config``, for the NNX network (its kernels only)."""
  config = create_vit_config()
  config.prune_leaves = ("kernel",)
  config.model.name = "test_nnx"
  del config.model.options["dim"]
  return config


CONFIGS = {"test_vit": create_vit_config, "test_nnx": create_nnx_config}


@pytest.fixture(scope="module")
def train_once(tmp_path_factory):
  """``train_once(name)``: the run of ``CONFIGS[name]`` as its workdir holds it, trained once
  per test session (by whichever pytest-xdist worker asks first)."""
  runs = {}

  def train(name):
    if name not in runs:
      folder = compute_once_per_session(
        tmp_path_factory,
        f"user_model_{name}",
        lambda folder: swamp_jax.run(CONFIGS[name](), str(folder / "run")),
      )
      workdir = str(folder / "run")
      final = swamp_jax.load_final_model(os.path.join(workdir, "final_model"))
      rounds = swamp_jax.read_results(workdir)
      runs[name] = swamp_jax.SwampResult(
        rounds, final["params"], final["batch_stats"], final["mask"], workdir
      )
    return runs[name]

  return train


@pytest.fixture(scope="module")
def vit_run(train_once):
  return train_once("test_vit")


def test_vit_prunes_its_attention_kernels_layerwise_at_exact_counts(vit_run):
  kernels = vit_run.mask["attention"]
  assert set(kernels) == set(ATTENTION_KERNELS)
  for name in ATTENTION_KERNELS:
    mask = np.asarray(kernels[name]["kernel"])
    assert mask.ndim == 3  # DenseGeneral: [in, heads, head_dim] or [heads, head_dim, out]
    assert mask.size - mask.sum() == round(0.2 * mask.size)
    assert np.all(np.asarray(vit_run.params["attention"][name]["kernel"])[~mask] == 0)
  for leaf in (vit_run.mask["position"]["embedding"], vit_run.mask["patch_embed"]["kernel"]):
    leaf = np.asarray(leaf)  # an Embed table (via prune_leaves) and a 4-D conv kernel
    assert leaf.size - leaf.sum() == round(0.2 * leaf.size)
  assert np.all(vit_run.mask["bn"]["scale"])  # norms stay dense
  assert [r.num_particles for r in vit_run.rounds] == [4, 4]


def test_nnx_model_by_name_trains_and_prunes_its_attention_kernels(train_once):
  out = train_once("test_nnx")
  for name in ATTENTION_KERNELS:
    mask = np.asarray(out.mask["attention"][name]["kernel"])
    assert mask.ndim == 3 and mask.size - mask.sum() == round(0.2 * mask.size)
    assert np.all(np.asarray(out.params["attention"][name]["kernel"])[~mask] == 0)
  assert set(out.batch_stats["bn"]) == {"mean", "var"}
  assert np.all(out.mask["bn"]["scale"])
  assert [r.num_particles for r in out.rounds] == [4, 4]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analyses_rebuild_the_registered_model_from_the_saved_run(name, train_once):
  out = train_once(name)
  run = saved_runs.load_run(out.workdir)
  if name == "test_vit":
    assert isinstance(run.model, TinyViT) and run.model.dim == 16
  else:
    assert isinstance(run.model, models.NnxModel) and run.model.module_type is NnxNet
  ensemble = swamp_jax.evaluate_ensemble_of_runs([out.workdir] * 2, 1, run.dataset, run.model)
  assert ensemble["member_accuracies"][0] == pytest.approx(out.final.test_accuracy, abs=1e-6)
  connectivity = swamp_jax.compute_particle_connectivity(out.workdir, 1, num_alphas=3)
  assert len(connectivity["accuracy"]) == 3 and np.isfinite(connectivity["loss_barrier"])
  trace = swamp_jax.compute_round_hessian_trace(out.workdir, 1, num_probes=2, num_batches=1)
  assert np.isfinite(trace["trace"])
  config = saved_runs.load_config(out.workdir)
  retrained = swamp_jax.retrain_on_saved_mask(config, out.workdir, 1)
  for a, b in zip(jax.tree.leaves(retrained.mask), jax.tree.leaves(out.mask), strict=True):
    np.testing.assert_array_equal(a, b)
  assert retrained.sparsity == pytest.approx(out.final.sparsity)


def test_lottery_pools_of_a_user_model(train_once):
  # On one of the two user models (the cheaper to compile): Lottery Pools reads the saved
  # round models and evaluates interpolations, as the analyses above.
  out = train_once("test_nnx")
  pool = swamp_jax.compute_lottery_pool_of_run(out.workdir, 1, coefficients=(0.5,))
  assert pool["validation_accuracy"] >= pool["ticket_validation_accuracy"]
  assert set(pool["weights"]) <= {0, 1} and 1 in pool["weights"]
  assert sum(pool["weights"].values()) == pytest.approx(1.0)
  assert 0.0 <= pool["test_accuracy"] <= 1.0


_KILLED_RUN = """
import sys
from tests import test_user_models
import swamp_jax
swamp_jax.run(test_user_models.CONFIGS[sys.argv[2]](), sys.argv[1])
"""


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumes_bit_identically_after_sigkill(name, train_once, tmp_path):
  uninterrupted = train_once(name)
  workdir = tmp_path / "run"
  env = {**create_fake_device_env(1), "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILLED_RUN, str(workdir), name],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  checkpoints = workdir / checkpointing.CHECKPOINT_DIR
  deadline = time.time() + 120
  # Checkpoint ids count steps trained, 2 per round: kill inside round 0.
  while time.time() < deadline and not (checkpoints / "1").is_dir():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL and not (workdir / "final_model").exists()
  resumed = swamp_jax.run(CONFIGS[name](), str(workdir))  # in this process
  for a, b in zip(
    jax.tree_util.tree_leaves(
      (uninterrupted.params, uninterrupted.batch_stats, uninterrupted.mask)
    ),
    jax.tree_util.tree_leaves((resumed.params, resumed.batch_stats, resumed.mask)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert [r.test_accuracy for r in resumed.rounds] == [
    r.test_accuracy for r in uninterrupted.rounds
  ]


# --- BatchNorm statistics whatever the momentum. ---


class _ConvBN(nn.Module):
  momentum: float

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(3, (3, 3))(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)


class _NnxConvBN(nnx.Module):
  def __init__(self, momentum: float, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(3, momentum=momentum, use_fast_variance=False, rngs=rngs)

  def __call__(self, x, train: bool):
    return self.bn(self.conv(x), use_running_average=not train)


@pytest.mark.parametrize("momentum", [0.99, 0.5])
def test_batch_statistics_are_the_batch_s_own_whatever_the_momentum(momentum):
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  for model in (_ConvBN(momentum), models.as_functional(_NnxConvBN(momentum, nnx.Rngs(0)))):
    variables = model.init(jax.random.key(0), x, train=False)
    compute = jax.jit(lambda v, m=model: batchnorm.compute_batch_statistics(m, v, x))
    (layer,) = compute(variables).values()
    params = variables["params"]
    conv = next(v for v in params.values() if "kernel" in v)
    y = jax.lax.conv_general_dilated(
      x, conv["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = np.asarray(y + conv["bias"], np.float64)  # the conv's output: the BN layer's input
    np.testing.assert_allclose(layer["mean"], y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer["var"], y.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # The old running statistics do not enter (momentum 0 for this call, not `momentum`).
    old = jax.tree_util.tree_map(lambda s: s + 3.0, variables["batch_stats"])
    (again,) = compute({**variables, "batch_stats": old}).values()
    for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(again), strict=True):
      np.testing.assert_array_equal(a, b)


# --- The contract, checked before anything is written. ---


class _ConvBNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = _ConvBN(0.9)(x, train)
    return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))


class _NoTrain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class _Logits(nn.Module):
  shape: tuple

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Dense(int(np.prod(self.shape)))(x.reshape(x.shape[0], -1))
    return y.reshape(x.shape[0], *self.shape)


class _NoKernel(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    w = self.param("weights", nn.initializers.zeros, (64, 10))
    return x.reshape(x.shape[0], -1) @ w


@pytest.mark.parametrize(
  "model, message",
  [
    (_NoTrain(), r"_NoTrain's __call__\(self, x\) has no `train` argument"),
    (_Logits((10, 2)), r"logits of shape \(2, 10, 2\).*must return \[batch, num_classes\]"),
    (_Logits((5,)), r"labels go up to 9 but the model _Logits returns 5 logits"),
    (_NoKernel(), r"no prunable weights.*param leaves are named \['weights'\].*prune_leaves"),
  ],
)
def test_a_model_breaking_the_contract_is_refused_naming_the_part(model, message, tmp_path):
  config = create_tiny_config(num_rounds=0, rewind_epochs=0, epochs_per_round=1)
  with pytest.raises(ValueError, match=message):
    swamp_jax.run(config, str(tmp_path / "run"), model=model)
  assert not (tmp_path / "run").exists()


def test_unknown_model_name_lists_the_registered_ones(tmp_path):
  config = create_tiny_config()
  config.model.name = "my_vit"
  with pytest.raises(ValueError, match=r"unknown model 'my_vit'; registered: .*test_vit.*"):
    swamp_jax.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_shipped_names_cannot_be_taken_and_options_are_checked():
  with pytest.raises(ValueError, match="shipped"):
    swamp_jax.register_model("resnet20", TinyViT)
  with pytest.raises(ValueError, match="shipped"):
    swamp_jax.register_model("wrn16_8", TinyViT)
  with pytest.raises(ValueError, match=r"'test_vit' does not take these options.*depth"):
    swamp_jax.create_model("test_vit", 10, depth=3)


def test_a_passed_model_trains_and_saved_runs_say_to_register_it(tmp_path):
  config = create_tiny_config(
    num_particles=2, num_rounds=0, rewind_epochs=0, epochs_per_round=1, dataset__train_size=256
  )
  out = swamp_jax.run(config, str(tmp_path / "run"), model=_ConvBNNet())
  assert set(out.batch_stats["_ConvBN_0"]["BatchNorm_0"]) == {"mean", "var"}
  with pytest.raises(ValueError, match=r"passed as an object.*_ConvBNNet.*register_model"):
    saved_runs.load_run(str(tmp_path / "run"))
  assert masking.compute_sparsity(out.mask, masking.compute_prunable(out.params)) == 0.0
  # The public round takes the model again: from the config's ticket on the run's mask it
  # is the run's round 0, the same programs on the same steps.
  again = swamp_jax.train_round(config, None, out.mask, 0, model=_ConvBNNet())
  for a, b in zip(
    jax.tree.leaves((out.params, out.batch_stats)),
    jax.tree.leaves((again.params, again.batch_stats)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert float(again.metrics["average/test_accuracy"]) == out.final.test_accuracy


def test_configs_example_registers_its_model_from_a_user_module(tmp_path):
  env = {**create_fake_device_env(1), "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "swamp_jax",
      "--config=configs/user_model.py",
      f"--workdir={tmp_path / 'run'}",
      "--config.num_particles=2",
      "--config.num_rounds=0",
      "--config.rewind_epochs=0",
      "--config.epochs_per_round=1",
      "--config.dataset.train_size=128",
      "--config.model.options.dim=8",
      "--config.progress=False",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = saved_runs.load_config(str(tmp_path / "run"))
  assert config.model.name == "mixer" and config.model.options.dim == 8
  assert pathlib.Path(tmp_path / "run" / "final_model").is_dir()
  assert os.path.isfile(tmp_path / "run" / "results.jsonl")
