"""Reading the known image and mask of an inpainting or outpainting request.

Images are PNG/JPEG/... files (or an .npz holding a uint8 `image`), and must
already have the model's size: resizing would invent the very pixels the
model is asked to keep. Masks are greyscale images: white (>= 128) marks the
pixels to keep, black the pixels to fill; a mask with transparent pixels is
refused, as its transparency would be ignored.
"""
import os

import numpy as np
from PIL import Image

from ddpm_jax.data import image_ops


def _read_uint8(path: str, channels: int, opaque: bool = False) -> np.ndarray:
  """uint8 `[H, W, channels]` from an image file or an .npz with `image`.

  `opaque`: refuse an image with transparent pixels.
  """
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ValueError(f"{path} {what}: pass an image file (PNG, JPEG, ...) or "
                     "an .npz holding a uint8 'image'.")
  if path.lower().endswith(".npz"):
    with np.load(path) as f:
      if "image" not in f.files:
        raise ValueError(f"{path} has no 'image' array (it has {f.files}).")
      image = np.asarray(f["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != channels:
      raise ValueError(f"{path}: 'image' must be uint8 [H, W, {channels}], got "
                       f"{image.dtype} {image.shape}.")
    return image
  try:
    with Image.open(path) as im:
      if opaque and im.has_transparency_data and (
          np.asarray(im.convert("RGBA"))[..., 3].min() < 255):
        raise ValueError(
            f"The mask {path} has transparent pixels, but masks are read as "
            "greyscale (white = keep, black = fill) and transparency is "
            "ignored: save it without an alpha channel.")
      image = np.asarray(image_ops.upright_with_channels(im, channels))
  except OSError as e:
    raise ValueError(f"Cannot read image {path}: {e}") from None
  return image.reshape(image.shape[:2] + (channels,))


def _to_model_range(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 127.5 - 1.0


def load_inpainting(image_path: str, mask_path: str, image_size: int,
                    channels: int) -> tuple[np.ndarray, np.ndarray]:
  """The known image float32 `[S, S, C]` in [-1, 1] and its mask `[S, S, 1]` in {0, 1}."""
  image = _read_uint8(image_path, channels)
  if image.shape[:2] != (image_size, image_size):
    raise ValueError(
        f"The image {image_path} is {image.shape[1]}x{image.shape[0]} but the "
        f"model makes {image_size}x{image_size} images; give an image of that "
        "size (or use --outpaint for a smaller one).")
  mask = _read_uint8(mask_path, 1, opaque=True)
  if mask.shape[:2] != (image_size, image_size):
    raise ValueError(
        f"The mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, the model's "
        f"images {image_size}x{image_size}: they must match.")
  keep = (mask >= 128).astype(np.float32)
  if keep.min() == 1.0:
    raise ValueError(f"The mask {mask_path} keeps every pixel: nothing to fill "
                     "(black marks the pixels to fill).")
  if keep.max() == 0.0:
    raise ValueError(f"The mask {mask_path} keeps no pixel: nothing is known "
                     "(white marks the pixels to keep); for unconditional "
                     "samples leave out --inpaint and --mask.")
  return _to_model_range(image), keep


def load_outpainting(image_path: str, image_size: int, channels: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A smaller image centred on the model's canvas; the border is to be filled.

  Returns the known canvas float32 `[S, S, C]` in [-1, 1] (zeros outside the
  image) and the mask `[S, S, 1]` (1 on the image).
  """
  image = _read_uint8(image_path, channels)
  h, w = image.shape[:2]
  if h > image_size or w > image_size or (h, w) == (image_size, image_size):
    raise ValueError(
        f"Outpainting needs an image smaller than the model's {image_size}x"
        f"{image_size} canvas; {image_path} is {w}x{h}.")
  top, left = (image_size - h) // 2, (image_size - w) // 2
  canvas = np.zeros((image_size, image_size, channels), np.float32)
  mask = np.zeros((image_size, image_size, 1), np.float32)
  canvas[top:top + h, left:left + w] = _to_model_range(image)
  mask[top:top + h, left:left + w] = 1.0
  return canvas, mask
