"""files.atomic_write: whole files or nothing, plain permissions, links kept;
files.file_sha256."""
import hashlib
import os
import stat

import numpy as np
import pytest

from ddpm_jax import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "out.npz"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError):
    with files.atomic_write(str(path)) as f:
      f.write(b"half")
      raise RuntimeError("killed")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["out.npz"]


def test_permissions_are_those_of_a_plain_open(tmp_path):
  old = os.umask(0o027)
  try:
    with files.atomic_write(str(tmp_path / "new" / "a.json"), "w") as f:
      f.write("{}")
    with open(tmp_path / "plain", "w") as f:
      f.write("{}")
  finally:
    os.umask(old)
  mode = stat.S_IMODE(os.stat(tmp_path / "new" / "a.json").st_mode)
  assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o640


def test_a_link_is_followed_and_kept(tmp_path):
  target = tmp_path / "real.png"
  target.write_bytes(b"old")
  link = tmp_path / "link.png"
  link.symlink_to(target)
  with files.atomic_write(str(link)) as f:
    f.write(b"new")
  assert link.is_symlink() and target.read_bytes() == b"new"


def test_a_path_that_is_not_a_regular_file_is_refused(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(ValueError, match="not a regular file"):
    with files.atomic_write(str(tmp_path / "d")) as f:
      f.write(b"x")
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match="not a regular file"):
    with files.atomic_write(str(fifo)) as f:
      f.write(b"x")
  assert sorted(os.listdir(tmp_path)) == ["d", "pipe"]


def test_file_sha256_in_chunks(tmp_path):
  path = str(tmp_path / "w.bin")
  content = np.random.default_rng(12).bytes(1000)
  with open(path, "wb") as f:
    f.write(content)
  want = hashlib.sha256(content).hexdigest()
  assert files.file_sha256(path) == want
  assert files.file_sha256(path, chunk_size=7) == want  # 142 full chunks + 6 bytes


def test_check_can_write_creates_the_directory_and_leaves_nothing(tmp_path):
  target = tmp_path / "a" / "b"
  files.check_can_write(str(target))
  assert target.is_dir() and os.listdir(target) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(OSError):  # a file where a parent directory should be
    files.check_can_write(str(tmp_path / "file" / "c"))
