"""Command line: ``python -m swamp_jax --config configs/digits.py --workdir DIR``.

Fields are overridden with ``--config.field=value`` (ml_collections
config_flags; the config is locked, so a typo'd field is an error).

The same command runs on a laptop and on a pod. With several processes,
``--distributed`` lets JAX detect the cluster (TPU pods, SLURM), or name it:
``--coordinator_address=host:port --num_processes=2 --process_id=0``
(``--cpu_collectives=gloo`` for processes on CPUs).

Errors end the command with one line, ``swamp_jax: error: ...``, naming the
cause: exit status 2 for a bad command line, 1 for anything else, 130 for
Ctrl-C (the run resumes with the same command). ``--verbose`` or
``SWAMP_JAX_TRACEBACK=1`` shows the traceback instead.
"""

import logging as std_logging
import os
import re
import sys

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
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message says it all; other types are named in the one line too.
_CLEAR_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError, flags.Error)


def _show_traceback(argv) -> bool:
  return os.environ.get("SWAMP_JAX_TRACEBACK", "") not in ("", "0") or any(
    a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv
  )


def _fail(message: str, status: int):
  print(f"swamp_jax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
  if isinstance(e, _CLEAR_ERRORS) and text:
    return text
  return f"{type(e).__name__}: {text} (--verbose shows the traceback)"


def _check_command_line(argv) -> None:
  """What absl and config_flags report with a traceback, said in one line first."""
  from swamp_jax import config as config_lib

  for previous, arg in zip(argv, argv[1:], strict=False):
    file = re.fullmatch(r"--config=(.+)", arg)
    value = file.group(1) if file else arg if previous == "--config" else None
    if value and not os.path.isfile(value.split(":")[0]):
      _fail(f"config file {value.split(':')[0]!r} does not exist (--config {value})", 2)
    override = re.fullmatch(r"--(?:no)?config\.([\w.]+)(=.*)?", arg)
    if not override:
      continue
    group, prefix = config_lib.get_default_config(), ""
    for name in override.group(1).split("."):
      if prefix.rstrip(".") in config_lib.FREE_GROUPS:
        break  # a model option: the config file defines it (config_flags says if not)
      if not hasattr(group, "keys") or name not in group:
        hint = config_lib.suggest_field(
          prefix, name, group.keys() if hasattr(group, "keys") else []
        )
        _fail(f"unknown config field {prefix + name!r} in {arg}{hint}", 2)
      group, prefix = group[name], f"{prefix}{name}."


def _parse_flags(argv):
  _check_command_line(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:
    if _show_traceback(argv):
      raise
    options = [a for a in argv if re.match(r"--config\.model\.options\.\w+", a)]
    if options and isinstance(e, AttributeError | KeyError):
      _fail(
        f"{options[0]}: the config file sets no such model option; config.model.options "
        "are the model factory's keyword arguments, and the command line overrides only "
        "those the config file sets",
        2,
      )
    _fail(_one_line(e), 2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]} (fields are set as --config.field=value)", 2)
  try:
    _main()
  except KeyboardInterrupt:
    if _show_traceback(sys.argv):
      raise
    _fail("interrupted; run the same command to resume from the last checkpoint", 130)
  except Exception as e:
    if _VERBOSE.value or _show_traceback(sys.argv):
      raise
    _fail(_one_line(e), 1)


class _DropInterrupts(std_logging.Filter):
  """Drops logged tracebacks of Ctrl-C (orbax logs one when interrupted while waiting
  for a save); ``main`` says it in one line."""

  def filter(self, record):
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def _main():
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every save at INFO; keep the terminal to the progress bar and results.
    logging.set_verbosity(logging.WARNING)
  if not _show_traceback(sys.argv):
    std_logging.getLogger("absl").addFilter(_DropInterrupts())
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
  app.run(main, flags_parser=_parse_flags)
