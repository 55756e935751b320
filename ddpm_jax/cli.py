"""What every command-line entry point shares: user errors end in one line, exit 1."""
import logging
import sys
from typing import Any, Callable

from absl import logging as absl_logging

# Bad flags, configs, data, files or workdirs: the library raises these with a
# message that says what was wrong; a traceback would only hide it.
USER_ERRORS = (ValueError, OSError)


def exit_on_user_error(fn: Callable[..., Any], *args,
                       errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
  """Calls `fn(*args)`; on one of `errors` prints `error: ...` to stderr and exits 1."""
  try:
    return fn(*args)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def quiet_orbax() -> None:
  """Keeps the console for progress: orbax logs every save and restore at INFO."""

  class _Filter(logging.Filter):

    def filter(self, record):
      return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())
