"""Tests of ddpm_jax.input_pipeline: sources, sharding, flips, state, eval.

References are computed here independently: sklearn's raw digits, tfds'
own data source, PIL resizes written out step by step, and multisets of
image bytes for shard coverage.
"""
import collections
import itertools
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from configs import default
from ddpm_jax import input_pipeline
from ddpm_jax.data import tfds_source


def digits_config(batch_size=20, image_size=8, random_flip=False,
                  num_classes=10):
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = image_size
  config.data.channels = 1
  config.data.num_classes = num_classes
  config.data.random_flip = random_flip
  config.training.batch_size = batch_size
  return config


def to_uint8(images):
  """Inverts x / 127.5 - 1 back to the integer pixel values (exact)."""
  return np.rint((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)


def sklearn_digits_uint8():
  raw = sk_datasets.load_digits()
  # floor(x + 1/2) in float64: a second way to round v * 255 / 16.
  images = np.floor(raw.images * 255.0 / 16.0 + 0.5).astype(np.uint8)
  return images[..., None], raw.target


def byte_counter(images):
  return collections.Counter(im.tobytes() for im in images)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ----------------------------------------------------------------- digits


def test_digits_values_labels_and_split_match_sklearn():
  images, labels = sklearn_digits_uint8()
  train = input_pipeline.create_source(digits_config(), "train")
  test = input_pipeline.create_source(digits_config(), "test")
  assert (len(train), len(test)) == (1500, 297)
  got_train = np.stack([train[i]["image"] for i in range(len(train))])
  got_test = np.stack([test[i]["image"] for i in range(len(test))])
  assert got_train.dtype == np.uint8 and got_train.shape == (1500, 8, 8, 1)
  np.testing.assert_array_equal(got_train, images[:1500])
  np.testing.assert_array_equal(got_test, images[1500:])
  np.testing.assert_array_equal([train[i]["label"] for i in range(1500)],
                                labels[:1500])
  np.testing.assert_array_equal([test[i]["label"] for i in range(297)],
                                labels[1500:])
  assert got_train.min() == 0 and got_train.max() == 255
  # Without labels in the config every label is 0.
  unlabelled = input_pipeline.create_source(digits_config(num_classes=0),
                                            "train")
  assert {int(unlabelled[i]["label"]) for i in range(50)} == {0}
  # A tfds slice is refused with the way to take the first N examples.
  with pytest.raises(ValueError, match=r"got split='test\[:4\]' \(slices are for "
                     r"tfds data sets; num_examples=N takes the first N"):
    input_pipeline.create_source(digits_config(), "test[:4]")


def test_digits_resized_to_16_with_pil_bicubic():
  images, _ = sklearn_digits_uint8()
  source = input_pipeline.create_source(digits_config(image_size=16), "test")
  for i in (0, 7, 296):
    ref = Image.fromarray(images[1500 + i, :, :, 0]).resize((16, 16),
                                                           Image.BICUBIC)
    np.testing.assert_array_equal(source[i]["image"][..., 0], np.asarray(ref))


@pytest.mark.parametrize("field,value,match", [
    ("channels", 3, "greyscale"),
    ("num_classes", 5, "10 classes"),
    ("dataset", "not_a_dataset_xyz", "not_a_dataset_xyz"),
    ("dataset", "mnist:foo", "folder:/path"),
])
def test_bad_data_config_is_a_clear_error(field, value, match):
  config = digits_config()
  config.data[field] = value
  with pytest.raises(ValueError, match=match):
    input_pipeline.create_source(config, "train")


# ------------------------------------------------------- train iterator


def test_train_batches_are_exactly_scaled_and_labelled():
  images, labels = sklearn_digits_uint8()
  index = {im.tobytes(): i for i, im in enumerate(images[:1500])}
  it = input_pipeline.create_train_iterator(digits_config(batch_size=20),
                                            seed=1)
  for batch in take(it, 5):
    assert batch["image"].dtype == np.float32
    assert batch["image"].shape == (20, 8, 8, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (20,)
    pixels = to_uint8(batch["image"])
    rows = [index[p.tobytes()] for p in pixels]  # KeyError: not a train image.
    np.testing.assert_array_equal(batch["label"], labels[rows])
    expected = images[rows].astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], expected, rtol=0,
                               atol=np.finfo(np.float32).eps)
    # The end points are exact, not merely close.
    np.testing.assert_array_equal(batch["image"][pixels == 0], -1.0)
    np.testing.assert_array_equal(batch["image"][pixels == 255], 1.0)


def test_flips_are_exact_mirrors_for_about_half():
  plain = input_pipeline.create_train_iterator(
      digits_config(batch_size=50, random_flip=False), seed=7)
  flipping = input_pipeline.create_train_iterator(
      digits_config(batch_size=50, random_flip=True), seed=7)
  flipped = 0
  total = 0
  for a, b in zip(take(plain, 8), take(flipping, 8)):
    np.testing.assert_array_equal(a["label"], b["label"])
    for x, y in zip(a["image"], b["image"]):
      same = np.array_equal(x, y)
      mirror = np.array_equal(x[:, ::-1], y)
      assert same or mirror
      flipped += mirror and not same
      total += 1
  assert 0.35 * total < flipped < 0.65 * total, (flipped, total)


def test_same_seed_same_batches_other_seed_other_order():
  config = digits_config(batch_size=16, random_flip=True)
  a = take(input_pipeline.create_train_iterator(config, seed=5), 3)
  b = take(input_pipeline.create_train_iterator(config, seed=5), 3)
  c = take(input_pipeline.create_train_iterator(config, seed=6), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_two_hosts_read_disjoint_slices_covering_the_train_set():
  images, _ = sklearn_digits_uint8()
  # Global batch 50 -> 25 per host; 1500 / 2 = 750 records = 30 batches.
  config = digits_config(batch_size=50)
  epochs = {}
  for host in (0, 1):
    it = input_pipeline.create_train_iterator(
        config, seed=3, process_index=host, process_count=2)
    batches = take(it, 60)
    assert all(b["image"].shape == (25, 8, 8, 1) for b in batches)
    pixels = to_uint8(np.concatenate([b["image"] for b in batches]))
    epochs[host] = (pixels[:750], pixels[750:])
    first, second = epochs[host]
    # One epoch visits each record of the slice once; the next epoch is the
    # same slice in a new order.
    assert byte_counter(first) == byte_counter(second)
    assert max(byte_counter(first).values()) == 1
    assert not np.array_equal(first, second)
  host0, host1 = byte_counter(epochs[0][0]), byte_counter(epochs[1][0])
  assert not set(host0) & set(host1)
  assert host0 + host1 == byte_counter(images[:1500])


def test_global_batch_must_divide_over_processes():
  with pytest.raises(ValueError, match="not divisible"):
    input_pipeline.create_train_iterator(
        digits_config(batch_size=15), seed=0, process_index=0,
        process_count=2)
  with pytest.raises(ValueError, match="seed"):
    input_pipeline.create_train_iterator(digits_config(), seed=-1)


def test_iterator_state_restores_exactly_through_orbax(tmp_path):
  config = digits_config(batch_size=16, random_flip=True)
  it = input_pipeline.create_train_iterator(config, seed=11)
  take(it, 4)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  state = {"w": np.arange(6.0)}
  manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = take(it, 5)

  fresh = input_pipeline.create_train_iterator(config, seed=11)
  restored = ocp.CheckpointManager(tmp_path / "checkpoints").restore(
      4, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state),
          data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored["state"]["w"], state["w"])
  got = take(restored["data"], 5)
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # A fresh iterator differs from the restored stream (the test can fail).
  assert not np.array_equal(
      next(input_pipeline.create_train_iterator(config, seed=11))["image"],
      expected[0]["image"])

  # Restoring into an iterator of another seed is refused, not silently used.
  other = input_pipeline.create_train_iterator(config, seed=12)
  with pytest.raises(ValueError, match="Sampler"):
    ocp.CheckpointManager(tmp_path / "checkpoints").restore(
        4, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(other)))


# -------------------------------------------------------- eval iterator


@pytest.mark.parametrize("num_examples,hosts,batch_size", [
    (None, 2, 40), (101, 3, 30), (297, 1, 297), (5, 4, 8)])
def test_eval_iterator_masks_each_example_exactly_once(num_examples, hosts,
                                                      batch_size):
  images, labels = sklearn_digits_uint8()
  n = 297 if num_examples is None else num_examples
  config = digits_config(random_flip=True)  # Eval must ignore flips.
  real_images, real_labels, real_index, num_batches = [], [], [], set()
  for host in range(hosts):
    batches = list(input_pipeline.create_eval_iterator(
        config, batch_size=batch_size, num_examples=num_examples,
        process_index=host, process_count=hosts))
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (batch_size // hosts, 8, 8, 1)
      assert b["mask"].dtype == np.bool_
      real_images.append(to_uint8(b["image"][b["mask"]]))
      real_labels.append(b["label"][b["mask"]])
      real_index.append(b["index"][b["mask"]])
      assert np.all(b["index"][~b["mask"]] == -1)
  assert len(num_batches) == 1  # Every host runs the same number of steps.
  # Host order then batch order is the split's order: each example once.
  np.testing.assert_array_equal(np.concatenate(real_images),
                                images[1500:1500 + n])
  np.testing.assert_array_equal(np.concatenate(real_labels),
                                labels[1500:1500 + n])
  np.testing.assert_array_equal(np.concatenate(real_index), np.arange(n))


def test_eval_iterator_rejects_bad_num_examples():
  for bad in (0, 298):
    with pytest.raises(ValueError, match=r"\[1, 297\]"):
      input_pipeline.create_eval_iterator(
          digits_config(), batch_size=10, num_examples=bad)


# ----------------------------------------------------------------- tfds


def cifar_config(batch_size=8, image_size=32):
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = image_size
  config.data.channels = 3
  config.data.num_classes = 10
  config.data.random_flip = False
  config.training.batch_size = batch_size
  return config


def test_tfds_cifar10_under_mock_data():
  with tfds.testing.mock_data(num_examples=16,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    peer = tfds.data_source("cifar10", split="train")
    ref_images = np.stack([peer[i]["image"] for i in range(16)])
    ref_labels = {peer[i]["image"].tobytes(): int(peer[i]["label"])
                  for i in range(16)}
    it = input_pipeline.create_train_iterator(cifar_config(), seed=0)
    batches = take(it, 2)  # 16 records / 8 = one epoch.
    pixels = to_uint8(np.concatenate([b["image"] for b in batches]))
    assert byte_counter(pixels) == byte_counter(ref_images)
    labels = np.concatenate([b["label"] for b in batches])
    assert [ref_labels[p.tobytes()] for p in pixels] == labels.tolist()

    # Other resolution: PIL bicubic resize of the 32x32 source.
    small = input_pipeline.create_source(cifar_config(image_size=16), "test")
    ref = Image.fromarray(tfds.data_source("cifar10", split="test")[3]["image"])
    np.testing.assert_array_equal(
        small[3]["image"], np.asarray(ref.resize((16, 16), Image.BICUBIC)))

    evals = list(input_pipeline.create_eval_iterator(cifar_config(),
                                                     batch_size=6))
    assert [int(b["mask"].sum()) for b in evals] == [6, 6, 4]

    bad = cifar_config()
    bad.data.channels = 1
    with pytest.raises(ValueError, match="3-channel"):
      input_pipeline.create_source(bad, "train")
    bad = cifar_config()
    bad.data.num_classes = 100
    with pytest.raises(ValueError, match="10 classes"):
      input_pipeline.create_source(bad, "train")


def test_tfds_name_takes_a_version_and_other_colons_are_refused():
  with tfds.testing.mock_data(num_examples=4,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    plain = input_pipeline.create_source(cifar_config(), "train")
    for version in ("3.0.2", "3.*.*"):
      config = cifar_config()
      config.data.dataset = f"cifar10:{version}"
      pinned = input_pipeline.create_source(config, "train")
      assert len(pinned) == len(plain) == 4
      for i in range(4):
        np.testing.assert_array_equal(pinned[i]["image"], plain[i]["image"])
    config.data.dataset = "cifar10:9.9.9"
    with pytest.raises(ValueError, match=r"cannot open 'cifar10:9.9.9'.*3\.0\.2"):
      input_pipeline.create_source(config, "train")
  for name in ("cifar10:latest", "cifar10:*", "Folder:/tmp", "cifar10:3.0", "./images", "a:1.0.0:2"):
    config.data.dataset = name
    with pytest.raises(ValueError, match="Unknown data set.*cifar10:3.0.2"):
      input_pipeline.create_source(config, "train")


def test_tfds_not_prepared_names_the_fix(tmp_path):
  config = cifar_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="array_record"):
    input_pipeline.create_source(config, "train")


def test_tfds_not_prepared_under_tfds_data_dir_names_the_fix(tmp_path):
  """Through TFDS_DATA_DIR tfds raises KeyError ('splits is empty'): same message."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  program = ("from configs import default; from ddpm_jax import input_pipeline\n"
             "try:\n  input_pipeline.create_source(default.get_config(), 'train')\n"
             "except ValueError as e:\n  print('ValueError:', e)\n")
  proc = subprocess.run([sys.executable, "-c", program], cwd=root, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path), PYTHONPATH=root))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ValueError: tfds data set 'cifar10'" in proc.stdout
  assert "array_record" in proc.stdout and str(tmp_path) in proc.stdout


def test_default_config_has_the_documented_data_keys():
  data = default.get_config().data
  assert data.data_dir == "" and data.worker_count == 0


class _FakeSplits:

  def __init__(self, names):
    self.info = type("Info", (), {"splits": {n: None for n in names}})()


def test_tfds_split_resolution():
  lsun = _FakeSplits(["train", "validation"])
  assert tfds_source._resolve_split(lsun, "lsun", "test") == "validation"
  assert tfds_source._resolve_split(lsun, "lsun", "train[-1%:]") == (
      "train[-1%:]")
  with pytest.raises(ValueError, match="has no split 'test'"):
    tfds_source._resolve_split(_FakeSplits(["train"]), "celeb_a_hq", "test")


# --------------------------------------------------------------- folder


def reference_square(path, size, mode):
  """Shorter side to `size` (bicubic), then the centred square, by hand."""
  image = Image.open(path).convert(mode)
  w, h = image.size
  if w <= h:
    new = (size, int(np.floor(h * size / w + 0.5)))
  else:
    new = (int(np.floor(w * size / h + 0.5)), size)
  array = np.asarray(image.resize(new, Image.BICUBIC))
  top = (array.shape[0] - size) // 2
  left = (array.shape[1] - size) // 2
  array = array[top:top + size, left:left + size]
  return array[..., None] if mode == "L" else array


def write_images(root):
  rng = np.random.default_rng(0)
  (root / "cats").mkdir(parents=True)
  (root / "dogs" / "deep").mkdir(parents=True)
  files = {
      "cats/a.png": (40, 30, "RGB"),  # (height, width): landscape crop.
      "cats/b.JPG": (21, 50, "RGB"),
      "dogs/c.png": (10, 10, "L"),  # Upscaled.
      "dogs/deep/d.webp": (16, 16, "RGBA"),  # Already the size.
      "dogs/e.bmp": (33, 17, "RGB"),
  }
  for name, (h, w, mode) in files.items():
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    if name.endswith(".webp"):
      image.save(root / name, lossless=True)
    else:
      image.save(root / name)
  (root / "notes.txt").write_text("not an image")
  return sorted(files)


def folder_config(root, channels=3, num_classes=0, batch_size=4):
  config = default.get_config()
  config.data.dataset = f"folder:{root}"
  config.data.image_size = 16
  config.data.channels = channels
  config.data.num_classes = num_classes
  config.data.random_flip = False
  config.training.batch_size = batch_size
  return config


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_images_resized_and_cropped_like_pil(tmp_path, channels):
  names = write_images(tmp_path)
  source = input_pipeline.create_source(
      folder_config(tmp_path, channels=channels, num_classes=2), "train")
  assert len(source) == 5
  mode = "RGB" if channels == 3 else "L"
  for i, name in enumerate(names):
    example = source[i]
    assert example["image"].shape == (16, 16, channels)
    np.testing.assert_array_equal(example["image"],
                                  reference_square(tmp_path / name, 16, mode))
    assert example["label"] == (0 if name.startswith("cats") else 1)
  it = input_pipeline.create_train_iterator(
      folder_config(tmp_path, channels=channels), seed=0)
  batch = next(it)
  assert batch["image"].shape == (4, 16, 16, channels)
  np.testing.assert_array_equal(batch["label"], 0)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    input_pipeline.create_source(folder_config(tmp_path / "nope"), "train")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match="no image files"):
    input_pipeline.create_source(folder_config(tmp_path / "empty"), "train")
  write_images(tmp_path / "imgs")
  with pytest.raises(ValueError, match="2 sub-folder"):
    input_pipeline.create_source(
        folder_config(tmp_path / "imgs", num_classes=3), "train")
  with pytest.raises(ValueError, match="single split"):
    input_pipeline.create_source(folder_config(tmp_path / "imgs"), "test")
  # A tfds slice of a folder used to be read as the whole folder.
  with pytest.raises(ValueError, match=r"got split='train\[:2\]'.*num_examples=N"):
    input_pipeline.create_source(folder_config(tmp_path / "imgs"), "train[:2]")
  bad = tmp_path / "imgs" / "dogs" / "broken.png"
  bad.write_bytes(b"\x89PNG but not really")
  with pytest.raises(ValueError, match=os.path.basename(str(bad))) as info:
    input_pipeline.create_source(folder_config(tmp_path / "imgs"), "train")
  assert "Remove or replace it" in str(info.value)


def save_random(path, shape, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def test_folder_fingerprint_follows_the_files(tmp_path):
  """FID's cached reference statistics of a folder are keyed by its files."""
  for i in range(3):
    save_random(tmp_path / f"{i}.png", (8, 8, 3), seed=i)
  make = lambda: input_pipeline.create_source(folder_config(tmp_path), "train")
  first, first_two = make().fingerprint(3), make().fingerprint(2)
  assert make().fingerprint(3) == first and first_two != first
  os.utime(tmp_path / "2.png", ns=(0, 10**18))  # the third file rewritten
  assert make().fingerprint(3) != first
  assert make().fingerprint(2) == first_two  # the first two are as they were
  save_random(tmp_path / "0.png", (12, 12, 3), seed=9)  # another size
  assert make().fingerprint(2) != first_two


def test_folder_skips_hidden_files_and_folders(tmp_path):
  """macOS '._x.png' AppleDouble files, .DS_Store, .ipynb_checkpoints/, .git/."""
  cat = save_random(tmp_path / "cats" / "a.png", (16, 16, 3), seed=1)
  dog = save_random(tmp_path / "dogs" / "b.png", (16, 16, 3), seed=2)
  (tmp_path / "cats" / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
  (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  save_random(tmp_path / ".ipynb_checkpoints" / "c.png", (16, 16, 3))
  save_random(tmp_path / "dogs" / ".git" / "d.png", (16, 16, 3))
  source = input_pipeline.create_source(folder_config(tmp_path, num_classes=2),
                                        "train")
  assert len(source) == 2 and source.class_names == ("cats", "dogs")
  np.testing.assert_array_equal(source[0]["image"], cat)
  np.testing.assert_array_equal(source[1]["image"], dog)
  assert [int(source[i]["label"]) for i in range(2)] == [0, 1]


def test_folder_follows_symlinked_sub_folders_without_looping(tmp_path):
  """`ln -s /big/disk/cats data/cats`: a linked class folder is read."""
  elsewhere = tmp_path / "elsewhere"
  cat = save_random(elsewhere / "cats" / "a.png", (16, 16, 3), seed=1)
  dog = save_random(tmp_path / "data" / "dogs" / "b.png", (16, 16, 3), seed=2)
  os.symlink(elsewhere / "cats", tmp_path / "data" / "cats")
  # A link back to an ancestor would make the walk endless.
  os.symlink(tmp_path / "data", tmp_path / "data" / "dogs" / "loop")
  source = input_pipeline.create_source(
      folder_config(tmp_path / "data", num_classes=2), "train")
  assert len(source) == 2 and source.class_names == ("cats", "dogs")
  np.testing.assert_array_equal(source[0]["image"], cat)
  np.testing.assert_array_equal(source[1]["image"], dog)
  assert [int(source[i]["label"]) for i in range(2)] == [0, 1]


def test_folder_16_bit_greyscale_png_keeps_its_range(tmp_path):
  """PIL opens it as 'I;16'; convert('L') would clip every value >= 255."""
  values = (np.arange(16 * 16, dtype=np.uint16) * 257).reshape(16, 16)
  Image.fromarray(values).save(tmp_path / "depth.png")
  assert Image.open(tmp_path / "depth.png").mode == "I;16"  # 16 bits on disk.
  expected = (values >> 8).astype(np.uint8)  # = 0, 1, ..., 255.
  grey = input_pipeline.create_source(folder_config(tmp_path, channels=1),
                                      "train")[0]["image"]
  np.testing.assert_array_equal(grey[..., 0], expected)
  rgb = input_pipeline.create_source(folder_config(tmp_path, channels=3),
                                     "train")[0]["image"]
  np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, -1))


def test_folder_with_an_empty_path_is_refused(tmp_path, monkeypatch):
  """'folder:$DATA' with DATA unset must not train on the working directory."""
  save_random(tmp_path / "stray.png", (16, 16, 3))
  monkeypatch.chdir(tmp_path)
  for dataset in ("folder:", "folder:  "):
    config = folder_config(tmp_path)
    config.data.dataset = dataset
    with pytest.raises(ValueError, match="names no folder"):
      input_pipeline.create_source(config, "train")


def test_folder_class_count_mismatch_names_empty_sub_folders(tmp_path):
  save_random(tmp_path / "a" / "1.png", (16, 16, 3))
  save_random(tmp_path / "c" / "1.png", (16, 16, 3))
  (tmp_path / "b").mkdir()
  with pytest.raises(ValueError) as info:
    input_pipeline.create_source(folder_config(tmp_path, num_classes=3),
                                 "train")
  message = str(info.value)
  assert "['a', 'c']" in message
  assert "without images: ['b']" in message
  assert "config.data.num_classes=2" in message
  # With the right count the empty folder is no class: labels 0 and 1.
  source = input_pipeline.create_source(folder_config(tmp_path, num_classes=2),
                                        "train")
  assert [int(source[i]["label"]) for i in range(2)] == [0, 1]


_LIBRARY_WORKER_SCRIPT = """
import os, sys, time
import numpy as np
if __name__ == "__main__":  # grain's workers are spawned: they re-import this.
  from test_input_pipeline import digits_config
  from ddpm_jax import input_pipeline
  out = sys.argv[1]
  batches = {}
  for workers in (0, 1):
    config = digits_config(random_flip=True)
    config.data.worker_count = workers
    it = input_pipeline.create_train_iterator(config, seed=5)
    batches[workers] = [next(it)["image"] for _ in range(3)]
  np.savez(out, *batches[0], *batches[1])
  print("ready", flush=True)
  time.sleep(600)
"""


def test_workers_outside_an_absl_app_and_after_their_trainer_dies(tmp_path):
  """A library caller (no absl app) gets worker batches equal to in-process ones;
  killed outright (SIGKILL), its grain worker exits too.

  Before: the first batch raised absl's UnparsedFlagAccessError, and the worker
  of a killed process ran on until killed by hand.
  """
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from test_train_cli import ROOT, _child_processes, _env  # pylint: disable=g-import-not-at-top
  script = tmp_path / "caller.py"
  script.write_text(_LIBRARY_WORKER_SCRIPT)
  out = tmp_path / "batches.npz"
  proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    line = proc.stdout.readline()
    assert line == "ready\n", line + proc.stdout.read()[-3000:]
    got = np.load(out)
    for i in range(3):
      np.testing.assert_array_equal(got[f"arr_{i + 3}"], got[f"arr_{i}"])
    workers = [int(pid) for pid in _child_processes(proc.pid)
               if "resource_tracker" not in _cmdline(pid)]
    assert workers, "no grain worker process"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(
      os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers):
    time.sleep(0.2)
  alive = [pid for pid in workers
           if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
  for pid in alive:
    os.kill(pid, signal.SIGKILL)
  assert not alive, f"grain workers {alive} outlived their killed parent"


def _cmdline(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().decode(errors="replace")
  except OSError:
    return ""


def _state(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "gone"


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"),
                                         (".bmp", "BMP")])
def test_folder_refuses_a_truncated_file_at_once(tmp_path, suffix, fmt):
  """A partly copied file has a readable header; it failed only when its pixels
  were read, at the first batch that held it. A complete file with data after
  its end mark (a phone's motion photo appends a video) is still read."""
  import io  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  data = buffer.getvalue()
  good = tmp_path / "good"
  good.mkdir()
  (good / f"a{suffix}").write_bytes(data)
  trailer = bytes(np.random.default_rng(1).integers(0, 256, 5000, np.uint8))
  (good / f"b{suffix}").write_bytes(data + trailer)
  source = input_pipeline.create_source(folder_config(good), "train")
  expected = reference_square(good / f"a{suffix}", 16, "RGB")
  np.testing.assert_array_equal(source[0]["image"], expected)
  np.testing.assert_array_equal(source[1]["image"], expected)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / f"a{suffix}").write_bytes(data)
  (bad / f"cut{suffix}").write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(ValueError, match=rf"cut\{suffix}.*truncated.*Remove or "
                                       "replace it"):
    input_pipeline.create_source(folder_config(bad), "train")


def test_a_batch_larger_than_the_data_is_warned_about(caplog):
  input_pipeline.create_train_iterator(digits_config(batch_size=2000), seed=0)
  assert "training.batch_size=2000 is larger than the train split (1500 records)" in caplog.text
  caplog.clear()
  input_pipeline.create_train_iterator(digits_config(batch_size=64), seed=0)
  assert "larger than the train split" not in caplog.text
