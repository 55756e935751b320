"""scikit-learn's 8x8 handwritten digits as a built-in data set (no download).

The 1797 images ship inside scikit-learn. The split is fixed and documented:
the first 1500 images (sklearn's order) are 'train', the last 297 are 'test'.
A contiguous split needs no random generator, so it cannot drift between numpy
versions; both splits hold every class (train 146..153 per class, test 27..33).
"""
import numpy as np

from ddpm_jax.data import image_ops

NUM_TRAIN = 1500
NUM_CLASSES = 10
NATIVE_SIZE = 8
CHANNELS = 1
SPLITS = ("train", "test")


def load_digits_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 8, 8, 1], labels int32 [N]) of one split.

  Pixel values 0..16 map to 0..255 as round(v * 255 / 16), rounding half to
  even (only v = 8 is a tie: 127.5 -> 128), so 0 -> 0 and 16 -> 255.
  """
  if split not in SPLITS:
    raise ValueError(
        f"The digits data set has splits {SPLITS}; got split={split!r}"
        + (" (slices are for tfds data sets; num_examples=N takes the first "
           "N examples)." if "[" in split else "."))
  from sklearn import datasets  # Imported here: only digits needs sklearn.
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  part = slice(None, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
  return images[part], labels[part]


class DigitsSource:
  """Random-access digits: `{'image': uint8 [S, S, 1], 'label': int32 []}`.

  Images are resized once at construction (bicubic, see `image_ops`) when
  `image_size` != 8; 1797 tiny images fit in memory many times over.
  """

  num_classes = NUM_CLASSES
  channels = CHANNELS

  def __init__(self, split: str, image_size: int):
    images, labels = load_digits_uint8(split)
    if image_size != NATIVE_SIZE:
      images = np.stack([image_ops.array_to_square(im, image_size)
                         for im in images])
    self._images = images
    self._labels = labels
    self._split = split
    self._image_size = image_size

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return (f"DigitsSource(split={self._split!r}, "
            f"image_size={self._image_size}, num_records={len(self)})")
