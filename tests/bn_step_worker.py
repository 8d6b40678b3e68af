"""One training chunk of mesh_worker's small BatchNorm CNN on one device and on a mesh
(for test_mesh.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/bn_step_worker.py OUT_DIR

writes OUT_DIR/none.npz (no mesh) and OUT_DIR/mesh.npz (2 particles x 2 data devices).
"""

import sys

import numpy as np


def main(out, particle_axis, data_axis, num_steps=2):
  import jax
  import jax.numpy as jnp
  from mesh_worker import SmallBatchNormNet

  from swamp_jax import distributed, imp, masking, optimizers, particles

  model = SmallBatchNormNet(10, "im2col")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 16, (256, 8, 8, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 256).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  mask = masking.create_dense_mask(params)
  spec = particles.StepSpec(64, 256, False, 100, 4)
  tx = optimizers.masked(optimizers.create_sgd(0.05))
  placement = None
  data = particles.DeviceData(images, labels, np.float32([8.0]), np.float32([4.0]))
  if particle_axis:
    placement = distributed.Placement(distributed.create_mesh(2, particle_axis, data_axis))
    data, params, batch_stats, mask = placement.replicate((data, params, batch_stats, mask))
  settings = imp.RoundSettings(0.2, True, 64, 0, 64)
  programs = imp.create_round_programs(
    model, tx, spec, masking.compute_prunable(params), settings, placement
  )
  keys = jnp.stack([imp.particle_key(0, 0, i) for i in range(2)])
  states = programs.start(params, batch_stats, mask, keys)
  states, losses = programs.train(states, mask, data, jnp.int32(0), num_steps=num_steps)
  flat = {"losses": np.asarray(losses)}
  for path, leaf in jax.tree_util.tree_leaves_with_path((states.params, states.batch_stats)):
    flat[f"state{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(out, **flat)


if __name__ == "__main__":
  for name, axes in (("none", (0, 0)), ("mesh", (2, 2))):
    main(f"{sys.argv[1]}/{name}.npz", *axes)
