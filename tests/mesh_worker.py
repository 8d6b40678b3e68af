"""Runs one small SWAMP run on a given mesh and saves what it found (used by test_mesh.py).

Started as a subprocess so that XLA_FLAGS (fake CPU devices) and
jax.distributed are set up before JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/mesh_worker.py --out r.npz --particle_axis 4 --data_axis 2
"""

import argparse
import json
import sys

import flax.linen as nn
import numpy as np

import swamp_jax
from swamp_jax.convolution import Conv, resolve_conv_impl
from swamp_jax.models.layers import batch_norm, max_pool


class SmallBatchNormNet(nn.Module):
  """conv3x3(8)-BN-relu-pool, conv3x3(16)-BN-relu, global mean, head: a BatchNorm CNN that
  compiles in a fraction of WRN-10-1's time (5 reductions in sequence forward)."""

  num_classes: int
  conv_impl: str = "im2col"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(8, kernel_size=3, impl=self.conv_impl, use_bias=False, name="conv1")(x)
    x = max_pool(nn.relu(batch_norm(self.bn_momentum, train, "bn1")(x)))
    x = Conv(16, kernel_size=3, impl=self.conv_impl, use_bias=False, name="conv2")(x)
    x = nn.relu(batch_norm(self.bn_momentum, train, "bn2")(x)).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


swamp_jax.register_model(
  "small_bn", lambda num_classes: SmallBatchNormNet(num_classes, resolve_conv_impl("auto"))
)


def make_config(model="lenet5", num_particles=4, particle_axis=0, data_axis=0):
  """The small run every mesh test compares (2 rounds of 1 epoch on digits)."""
  import swamp_jax

  c = swamp_jax.get_default_config()
  c.model.name = model
  c.num_particles = num_particles
  c.num_rounds = 1
  c.rewind_epochs = 1
  c.epochs_per_round = 1
  c.batch_size = 64
  c.optimizer.learning_rate = 0.05
  c.swa.learning_rate = 0.01
  c.swa.start = 0.5
  c.eval_batch_size = 360
  c.checkpoint.every_steps = 11
  c.progress = False
  c.mesh.particle_axis = particle_axis
  c.mesh.data_axis = data_axis
  return c


def get_config(arg: str = "lenet5,4"):
  """``make_config`` for the command line: ``--config tests/mesh_worker.py:small_bn,2``
  (model, num_particles), so a CLI launch runs exactly the program the tests compare."""
  model, num_particles = arg.split(",")
  return make_config(model, int(num_particles))


def _flatten(params, mask, batch_stats, rounds) -> dict:
  import jax

  flat = {}
  for name, tree in (("params", params), ("mask", mask), ("bs", batch_stats)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  flat["accuracy"] = np.asarray([r.test_accuracy for r in rounds])
  flat["particle_accuracy"] = np.asarray([r.particle_test_accuracy for r in rounds])
  return flat


def flatten_result(out) -> dict:
  """A ``SwampResult`` as named arrays: the final model, mask and every round's accuracies."""
  return _flatten(out.params, out.mask, out.batch_stats, out.rounds)


def flatten_workdir(workdir) -> dict:
  """``flatten_result``'s arrays for a finished run's workdir (its final model and results)."""
  from swamp_jax import results
  from swamp_jax import workdir as workdir_lib

  final = workdir_lib.load_final_model(f"{workdir}/{workdir_lib.FINAL_MODEL_DIR}")
  rounds = results.read_results(str(workdir))
  return _flatten(final["params"], final["mask"], final["batch_stats"], rounds)


def record_reference(config, workdir, rounds) -> dict:
  """What the equivalence checks of test_mesh.py need from the reference run (one device).

  ``pruned_from``: the averaged weights of the second-to-last round, from
  which the final mask was pruned (near-ties of the threshold may flip);
  ``logits_average``/``logits_particles``: every round's models on the test
  set (near-ties of the top two logits may flip a prediction).
  """
  import jax
  import jax.numpy as jnp

  from swamp_jax import data, datasets, run_setup
  from swamp_jax import workdir as workdir_lib

  dataset = datasets.load_dataset(config)
  model = run_setup.create_config_model(config, dataset.num_classes)
  x = data.preprocess(jnp.asarray(dataset.test_images), dataset.mean, dataset.std)

  def logits(params, batch_stats):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  flat = {}
  for r in range(len(rounds)):
    saved = workdir_lib.load_round_model(workdir, r)
    flat[f"logits_average_{r}"] = np.asarray(logits(saved["params"], saved["batch_stats"]))
    flat[f"logits_particles_{r}"] = np.asarray(
      jax.vmap(logits)(saved["particle_params"], saved["particle_batch_stats"])
    )
  if len(rounds) > 1:
    prev = workdir_lib.load_round_model(workdir, len(rounds) - 2)["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(prev):
      flat[f"pruned_from{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return flat


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--model", default="lenet5")
  parser.add_argument("--particle_axis", type=int, default=0)
  parser.add_argument("--data_axis", type=int, default=0)
  parser.add_argument("--num_particles", type=int, default=4)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()

  from swamp_jax import distributed

  if args.coordinator:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, "gloo")
  import jax

  import swamp_jax

  c = make_config(args.model, args.num_particles, args.particle_axis, args.data_axis)
  out = swamp_jax.run(c, args.workdir)
  flat = flatten_result(out)
  flat["devices"] = np.asarray(len(jax.devices()))
  flat["mesh"] = np.asarray(json.dumps(dict(swamp_jax.run_setup.create_placement(c).mesh.shape)))
  if jax.process_index() == 0:
    np.savez(args.out, **flat)
  return 0


if __name__ == "__main__":
  sys.exit(main())
