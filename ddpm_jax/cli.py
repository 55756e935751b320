"""What every command-line entry point shares: user errors end in one line, exit 1."""
import sys
from typing import Any, Callable

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
