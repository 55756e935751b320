"""A user's own images from a folder: `config.data.dataset = 'folder:/path'`.

Every file under the folder (recursively) whose extension is .png, .jpg,
.jpeg, .webp or .bmp (any case) is one example, in sorted path order. Images
are EXIF-rotated, converted to RGB or greyscale ('L') per
config.data.channels, resized (shorter side to image_size, bicubic,
antialiased) and centre-cropped. With config.data.num_classes > 0 the label
is the index of the image's first-level sub-folder in sorted order.
"""
import os

import numpy as np
from PIL import Image, ImageOps

from ddpm_jax.data import image_ops

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREFIX = "folder:"


def list_images(root: str) -> list[str]:
  """Sorted relative paths of the image files under `root` (recursive)."""
  if not os.path.isdir(root):
    raise ValueError(
        f"Image folder {root!r} does not exist or is not a directory "
        f"(config.data.dataset={PREFIX + root!r}).")
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()  # os.walk order is filesystem-dependent.
    for filename in filenames:
      if filename.lower().endswith(EXTENSIONS):
        paths.append(os.path.relpath(os.path.join(dirpath, filename), root))
  if not paths:
    raise ValueError(
        f"Image folder {root!r} holds no image files (looked recursively for "
        f"{', '.join(EXTENSIONS)}).")
  return sorted(paths)


def read_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """Reads one file as uint8 `[image_size, image_size, channels]`.

  Raises:
    ValueError: naming the file, when PIL cannot decode it.
  """
  try:
    with Image.open(path) as image:
      # Phone photos store their rotation in EXIF; apply it so that the
      # picture is upright as a viewer shows it.
      image = ImageOps.exif_transpose(image)
      image = image.convert("L" if channels == 1 else "RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot read image file {path!r}: {e}") from e
  array = np.asarray(image_ops.resize_and_center_crop(image, image_size))
  return array[..., None] if channels == 1 else array


class FolderImageSource:
  """Random-access folder images: `{'image': uint8 [S, S, C], 'label': int32 []}`.

  Construction lists the files and opens each one's header (not its pixels),
  so a file PIL cannot identify fails now, with its name, rather than hours
  into training; for 100k files this takes some seconds.
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
    root = os.path.abspath(os.path.expanduser(root))
    paths = list_images(root)
    for path in paths:
      full = os.path.join(root, path)
      try:
        with Image.open(full) as image:
          image.size  # pylint: disable=pointless-statement
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image file {full!r}: {e}") from e
    labels = np.zeros(len(paths), np.int32)
    if num_classes:
      classes = sorted({p.split(os.sep)[0] for p in paths if os.sep in p})
      loose = [p for p in paths if os.sep not in p]
      if loose or len(classes) != num_classes:
        raise ValueError(
            f"config.data.num_classes={num_classes} asks for class labels, "
            f"which an image folder gives as one sub-folder per class; "
            f"{root!r} has {len(classes)} sub-folder(s) with images "
            f"{classes[:20]}" + (f" and {len(loose)} image(s) outside any "
                                 "sub-folder" if loose else "")
            + ". Set config.data.num_classes=0 to train without labels.")
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

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image = read_image(os.path.join(self._root, self._paths[index]),
                       self._image_size, self.channels)
    return {"image": image, "label": self._labels[index]}

  def __repr__(self) -> str:
    return (f"FolderImageSource(root={self._root!r}, "
            f"image_size={self._image_size}, channels={self.channels}, "
            f"num_records={len(self)})")
