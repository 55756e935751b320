"""Image reading and geometry shared by every image source.

One function each, so that digits, tfds, folder and inpainting images are all
read and brought to the model's square resolution the same way.
"""
import numpy as np
from PIL import Image
from PIL import ImageOps


def upright_with_channels(image: Image.Image, channels: int) -> Image.Image:
  """A decoded file as a viewer shows it, in mode 'L' (channels 1) or 'RGB'.

  Applies the EXIF rotation of phone photos. A 16-bit greyscale PNG ('I;16',
  or 'I' from older Pillow) keeps its high byte, as PIL does itself for 16-bit
  RGB and grey+alpha PNGs: `convert('L')` would clip it at 255, turning the
  picture white. Transparency is dropped (the colour under it is kept).
  """
  image = ImageOps.exif_transpose(image)
  if image.mode.startswith("I"):
    high = np.asarray(image).astype(np.int64) >> 8
    image = Image.fromarray(np.clip(high, 0, 255).astype(np.uint8), "L")
  return image.convert("L" if channels == 1 else "RGB")


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Resizes the shorter side to `size` (bicubic) and centre-crops a square.

  PIL's bicubic filter widens its support when it shrinks an image, so
  downscaling is antialiased (no aliasing on 256 -> 32); upscaling (digits
  8 -> 16) interpolates bicubically, clipped to the uint8 range.

  Args:
    image: a PIL image of any size and mode.
    size: side of the square output, >= 1.

  Returns:
    A `size` x `size` PIL image of the same mode. An image that already has
    that size is returned unchanged (no resampling).
  """
  width, height = image.size
  if (width, height) == (size, size):
    return image
  scale = size / min(width, height)
  # max(): rounding must never leave the shorter side below `size`.
  new_width = max(size, round(width * scale))
  new_height = max(size, round(height * scale))
  image = image.resize((new_width, new_height), Image.BICUBIC)
  left = (new_width - size) // 2
  top = (new_height - size) // 2
  return image.crop((left, top, left + size, top + size))


def array_to_square(image: np.ndarray, size: int) -> np.ndarray:
  """`resize_and_center_crop` for a uint8 `[H, W, C]` array (C = 1 or 3).

  Returns uint8 `[size, size, C]`, the input itself when already that size.
  """
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f"Expected a uint8 image of shape [H, W, 1] or [H, W, 3], got shape "
        f"{image.shape}.")
  if image.shape[:2] == (size, size):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(resize_and_center_crop(pil, size))
  return out[..., None] if channels == 1 else out
