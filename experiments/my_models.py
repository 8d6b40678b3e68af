"""A user's own model, registered by name: an MLP-Mixer (Tolstikhin et al. 2021) for small images.

Importing this module registers 'mixer' (``swamp_jax.register_model``), so that a
config naming it (``configs/user_model.py``), the command line, saved runs and
the analyses can all build it. Analyse a finished run after the same import:

  from experiments import my_models  # registers 'mixer'
  import swamp_jax
  swamp_jax.compute_particle_connectivity('/tmp/swamp_mixer', round_index=2)
"""

import flax.linen as nn
import jax

import swamp_jax


class MlpMixer(nn.Module):
  """Patches -> tokens of ``dim``; ``depth`` blocks mixing tokens, then channels; a head.

  Input [batch, height, width, channels] with sides divisible by ``patch``;
  returns logits [batch, num_classes]. Its token-mixing and channel-mixing
  Dense kernels and the patch conv kernel are prunable (named 'kernel').
  """

  num_classes: int
  patch: int = 2
  dim: int = 32
  depth: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, name="stem")(x)
    x = x.reshape(x.shape[0], -1, self.dim)  # [batch, tokens, dim]
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"norm{i}_tokens")(x).swapaxes(1, 2)
      y = nn.Dense(y.shape[-1], name=f"mix{i}_tokens")(nn.gelu(y))
      x = x + y.swapaxes(1, 2)
      y = nn.LayerNorm(name=f"norm{i}_channels")(x)
      x = x + nn.Dense(self.dim, name=f"mix{i}_channels")(nn.gelu(y))
    x = nn.LayerNorm(name="norm")(x).mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)


def create_mixer(num_classes: int, patch: int = 2, dim: int = 32, depth: int = 2) -> MlpMixer:
  """The factory: ``config.model.options`` (patch, dim, depth) arrive as keyword arguments."""
  return MlpMixer(num_classes, patch, dim, depth)


swamp_jax.register_model("mixer", create_mixer)
