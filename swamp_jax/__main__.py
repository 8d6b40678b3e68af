"""Command line: ``python -m swamp_jax --config configs/digits.py --workdir DIR``.

Fields are overridden with ``--config.field=value`` (ml_collections
config_flags; the config is locked, so a typo'd field is an error).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from swamp_jax import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every save at INFO; keep the terminal to the progress bar and results.
    logging.set_verbosity(logging.WARNING)
  runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
