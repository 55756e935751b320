"""A user's own images from a folder: `config.data.dataset = 'folder:/path'`.

Every file under the folder (recursively, symlinked sub-folders included)
whose extension is .png, .jpg, .jpeg, .webp or .bmp (any case) is one
example, in sorted path order. Hidden files and folders (names starting with
'.': macOS '._x.png' AppleDouble files, .ipynb_checkpoints/, .git/) are
skipped. Images are EXIF-rotated, converted to RGB or greyscale ('L') per
config.data.channels (16-bit greyscale PNGs keep their high byte, as PIL does
for 16-bit colour), resized (shorter side to image_size, bicubic, antialiased)
and centre-cropped. With config.data.num_classes > 0 the label is the index
of the image's first-level sub-folder in sorted order.
"""
import hashlib
import os

import numpy as np
from PIL import Image

from ddpm_jax.data import image_ops

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREFIX = "folder:"


def list_images(root: str) -> list[str]:
  """Sorted relative paths of the image files under `root` (recursive).

  Skips hidden files and folders (names starting with '.'); follows
  symlinked folders, except a link back to a folder being walked (a loop).
  """
  if not os.path.isdir(root):
    raise ValueError(
        f"Image folder {root!r} does not exist or is not a directory.")
  paths = []
  # Real paths of the folders from `root` down to the one being walked.
  ancestors = {root: frozenset([os.path.realpath(root)])}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    above = ancestors.pop(dirpath)
    kept = []
    for name in sorted(dirnames):  # os.walk order is filesystem-dependent.
      child = os.path.join(dirpath, name)
      real = os.path.realpath(child)
      if not name.startswith(".") and real not in above:
        kept.append(name)
        ancestors[child] = above | {real}
    dirnames[:] = kept
    for filename in filenames:
      if (filename.lower().endswith(EXTENSIONS)
          and not filename.startswith(".")):
        paths.append(os.path.relpath(os.path.join(dirpath, filename), root))
  if not paths:
    raise ValueError(
        f"Image folder {root!r} holds no image files (looked recursively for "
        f"{', '.join(EXTENSIONS)}, skipping hidden files and folders).")
  return sorted(paths)


# How far from a file's end to look for its end marker: writers may pad a
# little after it. A file that fails the look is decoded in full (below), so
# larger trailers (phones' motion photos append a video) only cost time.
_TAIL_BYTES = 1024


def _may_be_truncated(file, image: Image.Image) -> bool:
  """Whether an opened file's end lacks its format's end mark.

  PNG ends with an IEND chunk and JPEG with an EOI marker (0xFFD9); a BMP
  header declares the file's size. A partly copied or downloaded file has a
  readable header but lacks these, and PIL would fail only when it reads the
  pixels. One read of the last bytes; other formats (WebP's header already
  fails when truncated) are not looked at.
  """
  size = file.seek(0, os.SEEK_END)
  if image.format == "BMP":
    file.seek(2)
    declared = int.from_bytes(file.read(4), "little")
    return declared == 0 or declared > size
  end = {"PNG": b"IEND", "JPEG": b"\xff\xd9", "MPO": b"\xff\xd9"}.get(
      image.format)
  if end is None:
    return False
  file.seek(max(0, size - _TAIL_BYTES))
  return end not in file.read()


# What PIL raises for a damaged file (a broken PNG chunk is a SyntaxError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError,
                  Image.DecompressionBombError)


def _unreadable(path: str, error: Exception) -> str:
  return (f"Cannot read image file {path!r}: {error}. Remove or replace it "
          "(every file with an image extension under the folder is read).")


def read_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """Reads one file as uint8 `[image_size, image_size, channels]`.

  Raises:
    ValueError: naming the file, when PIL cannot decode it.
  """
  try:
    with Image.open(path) as image:
      image = image_ops.upright_with_channels(image, channels)
  except _DECODE_ERRORS as e:
    raise ValueError(_unreadable(path, e)) from e
  array = np.asarray(image_ops.resize_and_center_crop(image, image_size))
  return array[..., None] if channels == 1 else array


class FolderImageSource:
  """Random-access folder images: `{'image': uint8 [S, S, C], 'label': int32 []}`.

  Construction lists the files, opens each one's header (not its pixels) and
  looks for its end mark (decoding the pixels only of a file without one), so
  a file PIL cannot identify, or a truncated one, fails now, with its name,
  rather than hours into training; for 100k files this takes some seconds.
  """

  def __init__(self, root: str, *, image_size: int, channels: int,
               num_classes: int):
    """Lists and checks the images.

    Args:
      root: the folder.
      image_size: side S of the square images returned.
      channels: 1 (greyscale) or 3 (RGB); images are converted to it.
      num_classes: 0 (label 0 for every image) or the number of first-level
        sub-folders, each a class.

    Raises:
      ValueError: folder missing or empty, an unreadable file (named), bad
        channels, or sub-folders that do not match num_classes.
    """
    if channels not in (1, 3):
      raise ValueError(
          f"config.data.channels must be 1 (greyscale) or 3 (RGB) for an "
          f"image folder; got {channels}.")
    if not root.strip():
      # 'folder:$DATA' with DATA unset would otherwise read the working
      # directory, recursively.
      raise ValueError(
          f"config.data.dataset={PREFIX + root!r} names no folder; use "
          f"'{PREFIX}/path/to/images'.")
    given = root
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise ValueError(
          f"Image folder {given!r} (config.data.dataset={PREFIX + given!r}"
          + (f", resolved to {root!r}" if root != given else "")
          + ") does not exist or is not a directory.")
    paths = list_images(root)
    for path in paths:
      full = os.path.join(root, path)
      try:
        with open(full, "rb") as file, Image.open(file) as image:
          suspect = _may_be_truncated(file, image)
        if suspect:
          with Image.open(full) as image:
            image.load()
      except _DECODE_ERRORS as e:
        raise ValueError(_unreadable(full, e)) from e
    labels = np.zeros(len(paths), np.int32)
    if num_classes:
      classes = sorted({p.split(os.sep)[0] for p in paths if os.sep in p})
      loose = [p for p in paths if os.sep not in p]
      if loose or len(classes) != num_classes:
        empty = sorted(
            name for name in os.listdir(root) if not name.startswith(".")
            and name not in classes and os.path.isdir(os.path.join(root, name)))
        raise ValueError(
            f"config.data.num_classes={num_classes} asks for class labels, "
            f"which an image folder gives as one sub-folder per class; "
            f"{root!r} has {len(classes)} sub-folder(s) with images "
            f"{classes[:20]}"
            + (f" and {len(loose)} image(s) outside any sub-folder" if loose
               else "")
            + (f" (sub-folders without images: {empty[:20]})" if empty
               else "")
            + ". Set config.data.num_classes=0 to train without labels"
            + ("" if loose or not classes else
               f", or config.data.num_classes={len(classes)} to use these "
               "sub-folders as the classes")
            + ".")
      index = {name: i for i, name in enumerate(classes)}
      labels = np.array([index[p.split(os.sep)[0]] for p in paths], np.int32)
      self.class_names = tuple(classes)
    self._root = root
    self._paths = paths
    self._labels = labels
    self._image_size = image_size
    self.channels = channels
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._paths)

  def fingerprint(self, num_examples: int) -> str:
    """sha256 of the first `num_examples` files' paths, sizes and modification
    times: it changes when those images do (cached reference statistics)."""
    digest = hashlib.sha256()
    for path in self._paths[:num_examples]:
      st = os.stat(os.path.join(self._root, path))
      digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image = read_image(os.path.join(self._root, self._paths[index]),
                       self._image_size, self.channels)
    return {"image": image, "label": self._labels[index]}

  def __repr__(self) -> str:
    return (f"FolderImageSource(root={self._root!r}, "
            f"image_size={self._image_size}, channels={self.channels}, "
            f"num_records={len(self)})")
