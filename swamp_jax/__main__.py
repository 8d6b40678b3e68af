"""Command line: ``python -m swamp_jax --config configs/digits.py --workdir DIR``.

Fields are overridden with ``--config.field=value`` (ml_collections
config_flags; the config is locked, so a typo'd field is an error).

The same command runs on a laptop and on a pod. With several processes,
``--distributed`` lets JAX detect the cluster (TPU pods, SLURM), or name it:
``--coordinator_address=host:port --num_processes=2 --process_id=0``
(``--cpu_collectives=gloo`` for processes on CPUs).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Start JAX's multi-process runtime, detecting the cluster."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
  "cpu_collectives", None, "CPU collectives for processes on CPUs, e.g. 'gloo'."
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds", 100, "A dead process is detected by the others after this long."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every save at INFO; keep the terminal to the progress bar and results.
    logging.set_verbosity(logging.WARNING)
  from swamp_jax import distributed

  if _DISTRIBUTED.value or _COORDINATOR.value:
    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      _CPU_COLLECTIVES.value,
      _HEARTBEAT.value,
    )
  from swamp_jax import runner

  runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
