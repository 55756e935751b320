"""Writing output files so that a failed or killed run never leaves half a file,
and fingerprinting inputs (`file_sha256`)."""
import contextlib
import hashlib
import os
import stat
import tempfile
from typing import IO, Iterator


def _umask() -> int:
  mask = os.umask(0o022)  # reading the umask means setting it; put it back
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file beside `path`; renames it onto `path` on success.

  The parent directory is created. If the block raises, the temporary file is
  removed and an existing `path` is left as it was. The file gets the
  permissions a plain `open` would give it (0666 less the umask); a symbolic
  link is followed, so the file it points at is replaced and the link kept.

  Args:
    path: the destination.
    mode: 'wb' or 'w'.

  Raises:
    ValueError: `path` exists and is not a regular file (a directory, device
      or pipe).
  """
  path = os.path.realpath(path)
  if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
    raise ValueError(f"{path} exists and is not a regular file; choose another "
                     "output path.")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  # The suffix keeps the extension, for writers that look at it (PIL).
  suffix = ".tmp" + os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.",
                             suffix=suffix)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def check_can_write(directory: str) -> None:
  """Creates `directory` if needed, then creates and removes a file in it.

  `os.access` says yes to root even where nothing can be written (/sys, a
  read-only mount), so this writes.

  Raises:
    OSError: the directory cannot be created or written.
  """
  os.makedirs(directory, exist_ok=True)
  fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
  os.close(fd)
  os.remove(probe)


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
  """The hex sha256 of a file's content, read in chunks of `chunk_size` bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()
