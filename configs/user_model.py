r"""A model of your own, by name: SWAMP on digits with the MLP-Mixer of experiments/my_models.py.

The config imports the module that registers the model, so the command line
knows it (run from the repository root, which puts ``experiments`` on the path):

  python -m swamp_jax --config configs/user_model.py --workdir /tmp/swamp_mixer
  python -m swamp_jax --config configs/user_model.py --workdir /tmp/swamp_mixer_wide \
    --config.model.options.dim=64

The model's own hyperparameters are ``config.model.options`` (its factory's
keyword arguments), so saved runs and analyses rebuild exactly this model.
"""

from experiments import my_models  # noqa: F401  (registers 'mixer')
from swamp_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "digits"
  config.model.name = "mixer"
  config.model.options.patch = 2
  config.model.options.dim = 32
  config.model.options.depth = 2
  config.num_particles = 4
  config.num_rounds = 8
  config.rewind_epochs = 1
  config.epochs_per_round = 10
  config.batch_size = 64
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.swa.learning_rate = 1e-3
  config.eval_batch_size = 512
  return config
