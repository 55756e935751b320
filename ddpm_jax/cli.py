"""What every command-line entry point shares: user errors end in one line, exit 1."""
import ast
import logging
import os
import signal
import sys
import traceback
from typing import Any, Callable

from absl import flags
from absl import logging as absl_logging
import ml_collections

# Bad flags, configs, data, files or workdirs: the library raises these with a
# message that says what was wrong; a traceback would only hide it.
USER_ERRORS = (ValueError, OSError)

# Orbax's, JAX's and tfds' log lines that every run prints by design: a
# checkpoint opened read-only for inference, the input pipeline's state left
# unrestored by `load_params`, the TPU probe on machines without one, and
# tfds' first try at a data set not on disk (our own error, or tfds' build
# from code, follows it).
_EXPECTED_LOGS = ("Given directory is read only",
                  'Item "data" was found in the checkpoint, but could not be restored',
                  # A step without state/_METADATA: CheckpointError says so.
                  'Item "state" was found in the checkpoint, but could not be restored',
                  "Unable to initialize backend 'tpu'",
                  'Failed to load dataset "')


def exit_on_user_error(fn: Callable[..., Any], *args,
                       errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
  """Calls `fn(*args)`; on one of `errors` prints `error: ...` to stderr and exits 1.

  Ctrl-C ends the run with `interrupted` and exit status 130, without a
  traceback (outputs are written atomically, so nothing is left half-done);
  SIGTERM after `stop_on_sigterm` with `terminated` and 143. Other
  exceptions propagate, except in a run of several processes, where the
  failing one prints its traceback and exits 1 at once (the others' next
  collective then fails).
  """
  try:
    return fn(*args)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    # One process of several: Python's exit would wait in jax.distributed's
    # shutdown barrier (5 minutes) for processes that are still running;
    # leaving at once tells them through the coordination service.
    _exit(1, now=_is_distributed())
  except Exception:  # pylint: disable=broad-except
    if not _is_distributed():
      raise
    # A bug or a failed device on one process of several: the same wait in
    # the shutdown barrier would keep the others in their next collective
    # for 5 minutes; leaving at once ends them too.
    traceback.print_exc()
    _exit(1, now=True)
  except KeyboardInterrupt as e:
    terminated = isinstance(e, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    # Ctrl-C while XLA compiles: Python's shutdown could crash in XLA's
    # compiler threads (a segfault instead of 130). The interrupt has already
    # unwound every `with`/`finally` that completes or removes an output.
    _exit(143 if terminated else 130, now=True)


def _is_distributed() -> bool:
  jax = sys.modules.get("jax")  # not imported: not initialised either
  return jax is not None and jax.distributed.is_initialized()


def _exit(status: int, now: bool) -> None:
  if not now:
    sys.exit(status)
  logging.shutdown()  # flushes absl's and Python's log handlers
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def _config_paths(argv) -> list[str]:
  """The files named by `--config FILE[:variant]` / `--config=FILE[:variant]`."""
  paths = []
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      paths.append(argv[i + 1])
    elif arg.startswith("--config="):
      paths.append(arg[len("--config="):])
  return [p.split(":")[0] for p in paths]


def parse_flags(argv):
  """absl flag parsing with one-line errors (exit 1), for `app.run(flags_parser=...)`.

  A config file in a `configs/` folder imports its siblings as `configs.X`,
  so that folder's parent goes on `sys.path` first: `--config
  /path/to/ddpm_jax/configs/cifar10.py` works from any directory.
  """
  for path in _config_paths(argv):
    if not os.path.isfile(path):
      print(f"error: --config {path}: no such file (configs/ holds the "
            "built-in ones, e.g. configs/digits.py).", file=sys.stderr)
      sys.exit(1)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "configs" and os.path.isfile(path):
      sys.path.insert(0, os.path.dirname(folder))
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:
    # absl's --help, --helpshort, --helpfull and --helpxml print the help,
    # then exit 1 (flag errors raise flags.Error instead): asking for help
    # succeeded, as with the benchmarks' and launch scripts' --help.
    sys.exit(0 if e.code == 1 else e.code)
  except SyntaxError as e:
    print(f"error: --config {e.filename}, line {e.lineno}: {e.msg}: "
          f"{(e.text or '').strip()}", file=sys.stderr)
    sys.exit(1)
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:
      # A config file's get_config raised: its own message is the last line.
      lines = [line for line in message.splitlines() if line.strip()]
      message = f"{lines[0]} {lines[-1]}"
    print(f"error: {message}\nPass --helpfull for the flags.", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    if "get_config" in str(e):
      print(f"error: --config {' '.join(_config_paths(argv))}: the file must "
            "define get_config() returning an ml_collections.ConfigDict "
            "(see configs/digits.py).", file=sys.stderr)
      sys.exit(1)
    # ml_collections raises these from a locked config for a key it lacks.
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    key = str(e.args[0]) if e.args else str(e)
    if key[:1] in "'\"":  # ml_collections passes on a KeyError's repr
      try:
        key = str(ast.literal_eval(key))
      except (ValueError, SyntaxError):
        pass
    key = " ".join(key.split())  # "'x' Did you mean "y" instead of "x"?"
    print(f"error: unknown config key {key} (in one of {overrides}). Every key is "
          "defined in configs/default.py (a locked config cannot gain keys).",
          file=sys.stderr)
    sys.exit(1)
  config = getattr(flags.FLAGS, "config", None) if "config" in flags.FLAGS else None
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    print(f"error: --config {' '.join(_config_paths(argv))}: get_config() "
          f"returned a {type(config).__name__}; it must return an "
          "ml_collections.ConfigDict (see configs/digits.py).", file=sys.stderr)
    sys.exit(1)
  return rest


def define_process_flags() -> None:
  """--coordinator_address, --num_processes, --process_id of a multi-process CLI.

  For several CPU processes on one machine (`launch/local.sh`); on a TPU pod
  or a SLURM cluster the processes find each other without them (see
  `parallel.initialize_distributed`).
  """
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (multi-process CPU runs; env "
                      "JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes (env JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None,
                       "This process's id (env JAX_PROCESS_ID).")


def initialize_processes() -> None:
  """Joins the other processes of a multi-process run; nothing for one process.

  Call before anything touches a device. Every process then runs the same
  program over the devices of all of them, and process 0 writes the outputs.
  """
  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(flags.FLAGS.coordinator_address,
                                  flags.FLAGS.num_processes,
                                  flags.FLAGS.process_id)


def on_process_0(check: Callable[[], None]) -> None:
  """Runs `check` on process 0 alone; if it raises, every process raises.

  For checks of what process 0 alone writes (an output file, the results
  directory). Were process 0 to stop alone, the others would wait for it in
  their next collective and abort with a stack dump; here they all end with
  a one-line error. With one process, `check` simply runs.

  Raises:
    what `check` raised (one of USER_ERRORS) on process 0; ValueError saying
    so on the others.
  """
  import jax  # pylint: disable=g-import-not-at-top
  error = None
  if jax.process_index() == 0:
    try:
      check()
    except USER_ERRORS as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(failed) and error is None:
      raise ValueError("process 0 refused the request (its error is in its "
                       "output).")
  if error is not None:
    raise error


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised where Python next runs (see `stop_on_sigterm`)."""


def stop_on_sigterm() -> None:
  """From now on SIGTERM stops the run as Ctrl-C does, outputs untouched: exit 143.

  Python's default would kill the process at once (an output's temporary file
  left behind), and under `jax.distributed` JAX's pre-emption notifier takes
  SIGTERM over, so the run would go on to the end. Call after
  `initialize_processes`; the trainer has handlers of its own (it saves).
  """
  def handle(signum, frame):
    del signum, frame
    raise Terminated()

  signal.signal(signal.SIGTERM, handle)


def apply_dtype(config: ml_collections.ConfigDict, dtype) -> bool:
  """Sets a loaded run's `model.dtype` to a CLI's --dtype; whether that changed it.

  `dtype` None (the flag not given) keeps the run's own compute dtype.
  """
  if not dtype or dtype == config.model.dtype:
    return False
  config.model.dtype = dtype
  return True


def quiet_orbax() -> None:
  """Keeps the console for progress and our errors.

  orbax logs every save and restore at INFO, and a failed restore leaves
  reports of its abandoned reads (`_quiet_closed_loop_reports`).
  """

  class _Filter(logging.Filter):

    def filter(self, record):
      if any(text in record.getMessage() for text in _EXPECTED_LOGS):
        return False
      return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())
  _quiet_closed_loop_reports()


def _quiet_closed_loop_reports() -> None:
  """Drops the `Event loop is closed` reports of reads orbax abandoned.

  Orbax reads a step's arrays concurrently and closes its event loop at the
  first failure; every read still in flight then prints a traceback of
  `RuntimeError: Event loop is closed` (an unraisable exception), which
  buries the one-line error about the damaged step. Other reports pass.
  """
  hook = sys.unraisablehook
  if getattr(hook, "ddpm_jax_quiet", False):
    return

  def quiet(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"):
      hook(unraisable)

  quiet.ddpm_jax_quiet = True
  sys.unraisablehook = quiet
