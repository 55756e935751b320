"""Writing output files so that a failed or killed run never leaves half a file."""
import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file beside `path`; renames it onto `path` on success.

  The parent directory is created. If the block raises, the temporary file is
  removed and an existing `path` is left as it was.

  Args:
    path: the destination.
    mode: 'wb' or 'w'.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # The suffix keeps the extension, for writers that look at it (PIL).
  suffix = ".tmp" + os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.",
                             suffix=suffix)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
