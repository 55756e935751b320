"""Any tfds image data set through `tfds.data_source` (random access, no TF).

`tfds.data_source` reads the ArrayRecord files of a prepared data set without
TensorFlow; `tfds.load` would need TensorFlow. The data set must have been
prepared once in the array_record format (see the README's "Data" section).
"""
from typing import Any

import numpy as np

from ddpm_jax.data import image_ops

PREPARE_HINT = (
    "Prepare it once on a machine with TensorFlow: `tfds build {name} "
    "--file_format=array_record` (or, in Python, `tfds.builder({name!r}, "
    "file_format='array_record').download_and_prepare()`), then point "
    "TFDS_DATA_DIR (or config.data.data_dir) at that data directory.")


def _resolve_split(builder: Any, name: str, split: str) -> str:
  """Maps the requested split to one the data set has.

  'test' falls back to 'validation' for data sets without a test split
  (lsun/*). Split names with tfds slicing ('train[-1%:]') pass through. When
  tfds knows no splits (mock data in tests) the name is used as given.
  """
  available = list(builder.info.splits.keys())
  if not available:
    return split
  base = split.split("[", 1)[0]
  if base in available:
    return split
  if split == "test" and "validation" in available:
    return "validation"
  raise ValueError(
      f"tfds data set {name!r} has no split {split!r}; it has "
      f"{sorted(available)}. Pass one of those (tfds slicing such as "
      "'train[-1%:]' works too).")


class TfdsImageSource:
  """Random-access tfds images: `{'image': uint8 [S, S, C], 'label': int32 []}`.

  Images whose size differs from `image_size` are resized (shorter side,
  bicubic, antialiased) and centre-cropped on read. The label is the data
  set's 'label' feature when `use_labels`, else 0.
  """

  def __init__(self, name: str, split: str, *, image_size: int, channels: int,
               num_classes: int, data_dir: str | None = None):
    """Opens the data source and checks it against the config.

    Args:
      name: tfds name, optionally with config and version ('celeb_a_hq/256',
        'cifar10:3.0.2').
      split: split name; 'test' falls back to 'validation' (see above).
      image_size: side S of the square images returned.
      channels: config.data.channels; must equal the data set's channels.
      num_classes: config.data.num_classes: 0 ignores labels, else it must
        equal the data set's number of classes.
      data_dir: tfds data directory; None uses TFDS_DATA_DIR or tfds' default.

    Raises:
      ValueError: unknown data set, missing split, data not prepared, or a
        channels / num_classes mismatch with the config.
    """
    import tensorflow_datasets as tfds  # Heavy import: only for tfds data.
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
          f"Unknown data set {name!r}: config.data.dataset must be 'digits', "
          "the name of a tfds image data set (e.g. 'cifar10', "
          "'celeb_a_hq/256', 'lsun/church_outdoor'; a version after a colon, "
          "'cifar10:3.0.2') or 'folder:/path/to/images'.") from e
    # tfds asserts on a version its code cannot load ('cifar10:9.9.9'); its
    # message lists the versions it can.
    except AssertionError as e:
      raise ValueError(f"tfds cannot open {name!r}: {e}") from e
    features = builder.info.features
    if "image" not in features:
      raise ValueError(
          f"tfds data set {name!r} has no 'image' feature (features: "
          f"{sorted(features.keys())}); it is not an image data set.")
    data_channels = features["image"].shape[-1]
    # None: tfds does not know the channel count; array_to_square checks
    # each image's shape on read instead.
    if data_channels is not None and data_channels != channels:
      raise ValueError(
          f"tfds data set {name!r} has {data_channels}-channel images but "
          f"config.data.channels={channels}; set config.data.channels="
          f"{data_channels}.")
    label_feature = features["label"] if "label" in features else None
    data_classes = getattr(label_feature, "num_classes", 0) or 0
    if num_classes and num_classes != data_classes:
      raise ValueError(
          f"config.data.num_classes={num_classes} but tfds data set {name!r} "
          + (f"has {data_classes} classes" if data_classes else
             "carries no class labels")
          + f"; set config.data.num_classes={data_classes} (0 ignores labels).")
    split = _resolve_split(builder, name, split)
    try:
      # download=False: never start a download (and TF-only preparation)
      # from inside a training job.
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      download=False)
    # tfds raises KeyError ("splits is empty") for a data set it knows but
    # finds no prepared files of.
    except (NotImplementedError, AssertionError, FileNotFoundError, KeyError) as e:
      raise ValueError(
          f"tfds data set {name!r} (split {split!r}) is not prepared in the "
          f"array_record format under {builder.data_dir}. "
          + PREPARE_HINT.format(name=name)) from e
    self._name = name
    self.split = split
    self._image_size = image_size
    self._use_labels = bool(num_classes)
    self.num_classes = data_classes
    self.channels = channels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._source[index]
    image = image_ops.array_to_square(np.asarray(example["image"]),
                                      self._image_size)
    label = np.int32(example["label"]) if self._use_labels else np.int32(0)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"TfdsImageSource(name={self._name!r}, split={self.split!r}, "
            f"image_size={self._image_size}, num_records={len(self)})")
