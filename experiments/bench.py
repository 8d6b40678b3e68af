r"""Particle-step benchmark: what N particles cost against N separate runs, per backend.

  python experiments/bench.py                    # small CNN and ResNet-20, both conv forms
  python experiments/bench.py --models lenet5 --particles 1,4 --repeats 5

Prints, for each model (MNIST-shaped lenet5, CIFAR-shaped resnet20) and conv
form ('xla' = lax.conv, 'im2col' = shifted slices + one matmul), measured in
this one run (medians over --repeats, after a compile):
  - time per training step for N = 1, 2, 4, 8 particles in one vmapped,
    scanned program, particle-steps per second, and the ratio of N particles'
    step to N times one particle's (1.0 = as cheap as N separate runs);
  - a scanned chunk against a Python loop of jitted single steps (N=1);
  - the share of a round's wall time spent outside compiled code (the
    round as run() trains it, one scan per epoch with a host sync, against
    the same steps in one compiled loop);
  - the particle state's size and the process's peak RSS;
  - one PyTorch CPU step of the same lenet5, if torch is installed.
Ratios are the result; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from swamp_jax import imp, masking, models, optimizers, particles

SHAPES = {"lenet5": ((28, 28, 1), 10), "resnet20": ((32, 32, 3), 10)}


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _setup(name, impl, steps, batch):
  shape, classes = SHAPES[name]
  model = models.create_model(name, classes, impl)
  rng = np.random.default_rng(0)
  n = steps * batch
  data = particles.DeviceData(
    jnp.asarray(rng.integers(0, 255, (n, *shape), dtype=np.uint8)),
    jnp.asarray(rng.integers(0, classes, n).astype(np.int32)),
    jnp.full((shape[-1],), 127.0),
    jnp.full((shape[-1],), 64.0),
  )
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False)
  params, bs = variables["params"], variables.get("batch_stats", {})
  mask = masking.create_dense_mask(params)
  spec = particles.StepSpec(batch, n, False, 10**9, steps)
  tx = optimizers.masked(optimizers.create_sgd(0.05))
  settings = imp.RoundSettings(0.2, False, batch, 1, batch)
  programs = imp.create_round_programs(model, tx, spec, masking.compute_prunable(params), settings)
  return model, data, params, bs, mask, spec, tx, programs


def bench_model(name, impl, particle_counts, steps, batch, repeats, measure_round=True):
  model, data, params, bs, mask, spec, tx, programs = _setup(name, impl, steps, batch)
  per_step = {}
  for n in particle_counts:
    keys = jnp.stack([imp.particle_key(0, 0, i) for i in range(n)])
    holder = [programs.start(params, bs, mask, keys)]

    def chunk(holder=holder):
      holder[0], losses = programs.train(holder[0], mask, data, jnp.int32(0), num_steps=steps)
      return losses

    chunk()  # compile
    per_step[n] = _median_time(chunk, repeats) / steps
    state_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(holder[0])) / 2**20
    print(
      f"  N={n}: {1e3 * per_step[n]:8.2f} ms/step  {n / per_step[n]:8.1f} particle-steps/s  "
      f"N-particle step / (N x one) = {per_step[n] / (n * per_step[particle_counts[0]]):5.2f}"
      f"  state {state_mb:.1f} MiB",
      flush=True,
    )

  # A Python loop of jitted single-particle steps against the scanned chunk (N=1).
  step = jax.jit(
    lambda s, t, p: particles.train_step(s, t, p, mask, data, model=model, tx=tx, spec=spec),
    donate_argnums=0,
  )
  state = [
    jax.tree_util.tree_map(
      lambda x: x[0], programs.start(params, bs, mask, imp.particle_key(0, 0, 0)[None])
    )
  ]
  perm = data_lib_perm(spec)

  def loop():
    for t in range(steps):
      state[0], loss = step(state[0], jnp.int32(t), perm)
    return loss

  loop()
  loop_step = _median_time(loop, repeats) / steps
  print(
    f"  scanned chunk / Python loop of jitted steps (N=1): "
    f"{per_step[particle_counts[0]] / loop_step:5.2f}  ({1e3 * loop_step:.2f} ms/step loop)"
  )
  for n in particle_counts[1:]:
    print(
      f"  N={n} scanned step / (N x one particle's Python-loop step) = "
      f"{per_step[n] / (n * loop_step):5.2f}"
    )

  if not measure_round:
    return per_step[particle_counts[0]]
  # Outside compiled code: a round as run() trains it (one scan per epoch, losses to the
  # host after each) against the same steps in one compiled loop.
  n = min(4, max(particle_counts))
  keys = jnp.stack([imp.particle_key(0, 0, i) for i in range(n)])
  epochs = 3
  holder = [programs.start(params, bs, mask, keys)]

  def per_epoch():
    for e in range(epochs):
      holder[0], losses = programs.train(
        holder[0], mask, data, jnp.int32(e * steps), num_steps=steps
      )
      np.asarray(losses)
    return losses

  whole = jax.jit(
    lambda s: jax.lax.fori_loop(
      0,
      epochs,
      lambda e, s: particles.train_steps(
        s, mask, data, e * steps, steps, model=model, tx=tx, spec=spec
      )[0],
      s,
    )
  )
  jax.block_until_ready(whole(holder[0]))
  per_epoch()
  t_round = _median_time(per_epoch, repeats)
  t_compiled = _median_time(lambda: whole(holder[0]), repeats)
  outside = max(0.0, (t_round - t_compiled) / t_round)
  print(
    f"  outside compiled code, N={n}, {epochs} epochs of {steps} steps: "
    f"{100 * outside:.1f}% of the round's wall time"
  )
  return per_step[particle_counts[0]]


def data_lib_perm(spec):
  from swamp_jax import data as data_lib

  return data_lib.compute_epoch_permutation(imp.particle_key(0, 0, 0), 0, spec.num_examples)


def bench_torch(steps, batch, repeats):
  try:
    import torch
  except ImportError:
    print("PyTorch not installed: no comparison")
    return None
  torch.manual_seed(0)
  torch.set_num_threads(max(1, torch.get_num_threads()))
  net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 6, 5, padding=2),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(6, 16, 5, padding=2),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Flatten(),
    torch.nn.Linear(16 * 7 * 7, 120),
    torch.nn.ReLU(),
    torch.nn.Linear(120, 84),
    torch.nn.ReLU(),
    torch.nn.Linear(84, 10),
  )
  opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
  x = torch.randn(batch, 1, 28, 28)
  y = torch.randint(0, 10, (batch,))

  def run():
    for _ in range(steps):
      opt.zero_grad()
      loss = torch.nn.functional.cross_entropy(net(x), y)
      loss.backward()
      opt.step()
    return jnp.zeros(())

  run()
  t = _median_time(run, repeats) / steps
  print(f"PyTorch {torch.__version__} CPU lenet5 step: {1e3 * t:.2f} ms")
  return t


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="lenet5,resnet20")
  parser.add_argument("--impls", default="xla,im2col")
  parser.add_argument("--particles", default="1,2,4,8")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_round", action="store_true", help="skip the outside-compiled share")
  args = parser.parse_args()
  counts = [int(n) for n in args.particles.split(",")]
  print(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s): "
    f"{jax.devices()[0].device_kind}; batch {args.batch}, medians of {args.repeats}"
  )
  one_particle = {}
  for name in args.models.split(","):
    for impl in args.impls.split(","):
      print(f"{name} [{impl}]", flush=True)
      one_particle[(name, impl)] = bench_model(
        name, impl, counts, args.steps, args.batch, args.repeats, not args.skip_round
      )
      print(
        f"  peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB",
        flush=True,
      )
  if "lenet5" in args.models and jax.default_backend() == "cpu":
    t_torch = bench_torch(args.steps, args.batch, args.repeats)
    if t_torch:
      for impl in args.impls.split(","):
        print(
          f"JAX lenet5 [{impl}] N=1 step / PyTorch step: "
          f"{one_particle[('lenet5', impl)] / t_torch:.2f}"
        )


if __name__ == "__main__":
  main()
