r"""One measured line per extension point: each run once through the public API on digits.

  nice python experiments/extension_points.py            # ~4 minutes on 2 CPU cores
  nice python experiments/extension_points.py --epochs 1 --rounds 1   # a quicker look

Runs SWAMP (N=4 particles, SWA, rewind to the initialization) on the embedded 8x8 digits
with each of swamp_jax's extension points in turn, and prints one Markdown row each: the
final round's test accuracy of the averaged model, its sparsity, and the run's wall
seconds (compilation included: these are tiny models, so it dominates). The points:

  - a registered linen model (a tiny ViT with self-attention, defined here);
  - a registered NNX model (rows as tokens, NNX attention and BatchNorm, defined here);
  - ``Dataset.from_arrays`` with the digits as image arrays [n, 8, 8, 1] (lenet300_100);
  - ``Dataset.from_arrays`` with flat feature vectors [n, 64] and an MLP (lenet300_100);
  - ``prune_scope='layerwise'``, ``prune_criterion='random'``, and a user ``prune_score``
    (|w| times the square root of the fan-in), each on lenet300_100;

with lenet300_100 under the defaults (global magnitude pruning) as the reference row.
The numbers say the points work end to end at these sizes, not how good they are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import swamp_jax


class TinyViT(nn.Module):
  """4x4 patches of 8x8 digits -> 4 tokens of ``dim``, one pre-norm transformer block."""

  num_classes: int
  dim: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.dim, (4, 4), strides=4, name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    x = x + nn.Embed(x.shape[1], self.dim, name="position")(jnp.arange(x.shape[1]))
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(nn.LayerNorm()(x))
    y = nn.Dense(2 * self.dim, name="mlp_in")(nn.LayerNorm()(x))
    x = x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(y))
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm()(x).mean(axis=1))


class NnxNet(nnx.Module):
  """Rows of an 8x8 image as 8 tokens: Linear, self-attention, BatchNorm, head."""

  def __init__(self, num_classes: int, dim: int = 32, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(4, dim, decode=False, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x, train: bool):
    x = self.embed(x.reshape(x.shape[0], 8, 8))
    x = x + self.attention(x)
    x = self.bn(x.mean(axis=1), use_running_average=not train)
    return self.head(nnx.relu(x))


def fan_in_magnitude(params, prunable):
  """|w| * sqrt(fan-in): a global threshold that no longer favours wide layers."""
  return jax.tree_util.tree_map(
    lambda w, p: jnp.abs(w) * jnp.sqrt(w[..., 0].size) if p else None, params, prunable
  )


def create_config(args, model: str = "lenet300_100"):
  config = swamp_jax.get_default_config()  # the embedded digits
  config.model.name = model
  config.num_particles = args.particles
  config.num_rounds = args.rounds
  config.epochs_per_round = args.epochs
  config.rewind_epochs = 0
  config.progress = False
  return config


def create_points(args):
  """(name, config, run keyword arguments) of every extension point."""
  swamp_jax.register_model("ext_vit", TinyViT)
  swamp_jax.register_model("ext_nnx", NnxNet)
  digits = swamp_jax.load_dataset(create_config(args))  # the arrays behind config 'digits'
  images = swamp_jax.Dataset.from_arrays(
    train=(digits.train_images, digits.train_labels),
    test=(digits.test_images, digits.test_labels),
    name="digits_arrays",
  )
  flat = lambda x: x.reshape(len(x), -1).astype("float32")  # noqa: E731
  features = swamp_jax.Dataset.from_arrays(
    train=(flat(digits.train_images), digits.train_labels),
    test=(flat(digits.test_images), digits.test_labels),
    name="digits_features",
  )
  layerwise = create_config(args)
  layerwise.prune_scope = "layerwise"
  random = create_config(args)
  random.prune_criterion = "random"
  return [
    ("reference: lenet300_100, global magnitude", create_config(args), {}),
    ("registered linen model (tiny ViT, attention)", create_config(args, "ext_vit"), {}),
    ("registered NNX model (attention, BatchNorm)", create_config(args, "ext_nnx"), {}),
    ("Dataset.from_arrays, images [n, 8, 8, 1]", create_config(args), {"dataset": images}),
    ("Dataset.from_arrays, features [n, 64], MLP", create_config(args), {"dataset": features}),
    ("prune_scope='layerwise'", layerwise, {}),
    ("prune_criterion='random'", random, {}),
    (
      "prune_score=fan_in_magnitude (user rule)",
      create_config(args),
      {"prune_score": fan_in_magnitude},
    ),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--particles", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=2, help="prunes after the dense round")
  parser.add_argument("--epochs", type=int, default=3, help="epochs per round")
  args = parser.parse_args()
  print(
    f"N={args.particles}, {args.rounds + 1} rounds (dense + {args.rounds} prunes of 20%) of "
    f"{args.epochs} epochs, digits, jax {jax.__version__} on {jax.devices()[0].platform}"
  )
  print("| extension point | final test accuracy | sparsity | wall s |")
  print("|---|---|---|---|")
  for name, config, kwargs in create_points(args):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # run's own per-round table
      out = swamp_jax.run(config, **kwargs)
    seconds = time.perf_counter() - start
    final = out.final
    print(
      f"| {name} | {100 * final.test_accuracy:.2f}% | {100 * final.sparsity:.2f}% "
      f"| {seconds:.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
