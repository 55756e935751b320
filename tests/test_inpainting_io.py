"""Reading the known image and mask of inpainting and outpainting requests."""
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import inpainting_io


def half_mask(size=8):
  mask = np.zeros((size, size), np.uint8)
  mask[:, : size // 2] = 255
  return mask


def test_image_and_mask_are_read_in_the_model_range(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "img.png")
  mask = half_mask()
  mask[0, 0] = 128  # grey levels from 128 up keep the pixel, below fill it
  mask[0, 7] = 127
  Image.fromarray(mask).save(tmp_path / "mask.png")
  known, keep = inpainting_io.load_inpainting(
      str(tmp_path / "img.png"), str(tmp_path / "mask.png"), 8, 3)
  np.testing.assert_array_equal(known, image.astype(np.float32) / 127.5 - 1)
  np.testing.assert_array_equal(keep[..., 0], (mask >= 128).astype(np.float32))
  assert keep[0, 0, 0] == 1 and keep[0, 7, 0] == 0


def test_sixteen_bit_greyscale_keeps_its_high_byte(tmp_path):
  # convert('L') clips 16-bit values at 255: the picture would read as white.
  values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7
  Image.fromarray(values).save(tmp_path / "grey16.png")
  with Image.open(tmp_path / "grey16.png") as im:
    assert im.mode.startswith("I")
  Image.fromarray(half_mask()).save(tmp_path / "mask.png")
  known, _ = inpainting_io.load_inpainting(
      str(tmp_path / "grey16.png"), str(tmp_path / "mask.png"), 8, 1)
  np.testing.assert_array_equal(
      known[..., 0], (values >> 8).astype(np.float32) / 127.5 - 1)


def test_masks_that_would_be_misread_are_refused(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
  img = str(tmp_path / "img.png")
  # Kept area drawn with the alpha channel over black: read as greyscale it
  # would be all black (fill everything).
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 3] = half_mask()
  Image.fromarray(rgba).save(tmp_path / "alpha.png")
  with pytest.raises(ValueError, match="has transparent pixels"):
    inpainting_io.load_inpainting(img, str(tmp_path / "alpha.png"), 8, 3)
  # The same mask fully opaque is read by its colour.
  rgba[..., :3] = half_mask()[..., None]
  rgba[..., 3] = 255
  Image.fromarray(rgba).save(tmp_path / "opaque.png")
  _, keep = inpainting_io.load_inpainting(img, str(tmp_path / "opaque.png"), 8, 3)
  np.testing.assert_array_equal(keep[..., 0], half_mask() / 255)
  for value, match in [(0, "keeps no pixel"), (255, "keeps every pixel")]:
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match=match):
      inpainting_io.load_inpainting(img, str(tmp_path / "m.png"), 8, 3)


def test_npz_images_are_recognised_whatever_the_case(tmp_path):
  image = np.full((4, 4, 3), 200, np.uint8)
  with open(tmp_path / "small.NPZ", "wb") as f:  # np.savez would add .npz
    np.savez(f, image=image)
  known, mask = inpainting_io.load_outpainting(str(tmp_path / "small.NPZ"), 8, 3)
  np.testing.assert_array_equal(known[2:6, 2:6], np.full((4, 4, 3), 200 / 127.5 - 1,
                                                        np.float32))
  assert mask.sum() == 16 and known[0, 0, 0] == 0
