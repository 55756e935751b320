"""Input pipeline: data sources -> grain -> per-host numpy batches.

`config.data.dataset` picks the source:
  * 'digits': scikit-learn's 8x8 digits, built in (`data/digits.py`);
  * a tfds name ('cifar10', 'celeb_a_hq/256', 'lsun/church_outdoor', ...)
    read with `tfds.data_source` (`data/tfds_source.py`);
  * 'folder:/path': a user's own images (`data/folder.py`).

Training batches come from a grain `DataLoader` whose iterator state goes
into the orbax checkpoint next to the train state, so a resumed run sees
exactly the batches an uninterrupted run would have seen:

  save:    ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it))
  restore: ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it))

where `it` is a fresh `create_train_iterator(config, seed=...)` built with the
same config, seed and process count.

Every host reads a different slice of the data (grain shards by process).
Each host yields its local batch; the trainer assembles the global batch with
`jax.make_array_from_process_local_data`.
"""
import multiprocessing
import os
import re
import signal
import threading
import time
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from ddpm_jax.data import digits
from ddpm_jax.data import folder
from ddpm_jax.data import tfds_source

Batch = dict[str, np.ndarray]

ACCEPTED_FORMS = ("'digits', a tfds image data set name such as 'cifar10' or "
                  "'celeb_a_hq/256' (optionally with a version: "
                  "'cifar10:3.0.2'), or 'folder:/path/to/images'")
# tfds' version forms after 'name:': '3.0.2', '3.*.*'.
_TFDS_VERSION = re.compile(r"\d+\.(\d+|\*)\.(\d+|\*)")


def create_source(config: ml_collections.ConfigDict, split: str) -> Any:
  """Returns the random-access source of `config.data.dataset`, one split.

  Args:
    config: reads data.{dataset, image_size, channels, num_classes} and the
      optional data.data_dir (tfds data directory).
    split: 'train' or 'test' (tfds: any split name or slice; 'test' falls
      back to 'validation' when the data set has no test split; an image
      folder has only 'train').

  Returns:
    An object with `len()` and `[i] -> {'image': uint8 [S, S, C],
    'label': int32 []}`, S = config.data.image_size, C = config.data.channels.

  Raises:
    ValueError: unknown data set, or one that does not match the config.
  """
  data = config.data
  name = data.dataset
  if not isinstance(name, str) or not name:
    raise ValueError(f"config.data.dataset must be {ACCEPTED_FORMS}; got "
                     f"{name!r}.")
  if not isinstance(data.image_size, int) or data.image_size < 1:
    raise ValueError(f"config.data.image_size must be a positive int; got "
                     f"{data.image_size!r}.")
  if name == "digits":
    if data.channels != digits.CHANNELS:
      raise ValueError(
          f"The digits data set is greyscale (1 channel) but "
          f"config.data.channels={data.channels}; set config.data.channels=1.")
    if data.num_classes not in (0, digits.NUM_CLASSES):
      raise ValueError(
          f"The digits data set has {digits.NUM_CLASSES} classes but "
          f"config.data.num_classes={data.num_classes}; set it to 10 (or 0 to "
          "ignore labels).")
    source = digits.DigitsSource(split, data.image_size)
    if not data.num_classes:
      source = _WithoutLabels(source)
    return source
  if name.startswith(folder.PREFIX):
    if split != "train":
      # A slice ('train[:100]') would be ignored: the folder has no tfds splits.
      raise ValueError(
          f"An image folder is a single split, 'train'; got split={split!r}. "
          "Evaluate it with split='train' (and the first N images with "
          "num_examples=N).")
    return folder.FolderImageSource(
        name[len(folder.PREFIX):], image_size=data.image_size,
        channels=data.channels, num_classes=data.num_classes)
  _, colon, version = name.partition(":")
  if (colon and not _TFDS_VERSION.fullmatch(version)) or name.startswith(("/", ".")):
    raise ValueError(f"Unknown data set {name!r}: config.data.dataset must be "
                     f"{ACCEPTED_FORMS}.")
  return tfds_source.TfdsImageSource(
      name, split, image_size=data.image_size, channels=data.channels,
      num_classes=data.num_classes, data_dir=data.get("data_dir") or None)


class _WithoutLabels:
  """Wraps a labelled source and sets every label to 0 (num_classes = 0)."""

  num_classes = 0

  def __init__(self, source: Any):
    self._source = source
    self.channels = source.channels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._source[index]["image"], "label": np.int32(0)}

  def __repr__(self) -> str:
    return f"WithoutLabels({self._source!r})"


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2.

  The coin comes from the `rng` grain derives from (seed, global record
  index), so the flips of a resumed run equal those of an uninterrupted one.
  """

  def random_map(self, element: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
      element = dict(element, image=element["image"][:, ::-1])
    return element


class ToModelInput(grain.transforms.Map):
  """Batched uint8 images -> float32 in [-1, 1] as x / 127.5 - 1; int32 labels."""

  def map(self, batch: dict[str, np.ndarray]) -> Batch:
    image = batch["image"].astype(np.float32) / np.float32(127.5)
    out = {"image": image - np.float32(1.0),
           "label": batch["label"].astype(np.int32)}
    if "mask" in batch:
      out["mask"] = batch["mask"].astype(bool)
      out["index"] = batch["index"].astype(np.int32)
    return out


def _exit_when_orphaned(parent_pid: int) -> None:
  """Polls the parent's pid; exits the worker once its parent has gone."""
  while os.getppid() == parent_pid:
    time.sleep(1.0)
  os._exit(1)  # pylint: disable=protected-access


def _bind_worker_to_trainer() -> "BindWorkerToTrainer":
  """Unpickles `BindWorkerToTrainer`; in a worker's main thread, binds it."""
  if (multiprocessing.parent_process() is not None
      and threading.current_thread() is threading.main_thread()):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not any(t.name == _WATCH_THREAD for t in threading.enumerate()):
      # The OS parent, which is the trainer (spawn) or a forkserver that
      # lives as long as the trainer: either way it goes when the trainer does.
      threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),),
                       name=_WATCH_THREAD, daemon=True).start()
  return BindWorkerToTrainer()


_WATCH_THREAD = "ddpm_jax-exit-when-orphaned"


class BindWorkerToTrainer(grain.transforms.Map):
  """A no-op whose unpickling in a grain worker ties the worker to its trainer.

  grain's DataLoader takes no worker initialiser; a worker unpickles the
  pipeline's operations in its main thread before it reads anything, so this
  operation's unpickling is the worker's initialiser. It does two things:
    * the worker ignores SIGINT. A terminal's Ctrl-C reaches every process of
      its group; the trainer answers it by saving and stopping (and then
      closes the workers), but each worker would also raise
      KeyboardInterrupt and print a traceback;
    * the worker exits within a second of its trainer's death. grain's
      workers do not watch their parent, so a trainer killed outright
      (SIGKILL, the out-of-memory killer, os._exit) left them running,
      holding memory, until killed by hand.
  """

  def map(self, element: Any) -> Any:
    return element

  def __reduce__(self):
    return _bind_worker_to_trainer, ()


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"The batch size must be a positive int; got "
                     f"{batch_size!r}.")
  if batch_size % process_count:
    raise ValueError(
        f"The global batch size {batch_size} is not divisible by the number "
        f"of processes (hosts) {process_count}; choose a multiple of "
        f"{process_count}.")
  return batch_size // process_count


def _host(process_index: int | None, process_count: int | None
          ) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  return process_index, process_count


def create_train_iterator(
    config: ml_collections.ConfigDict, *, seed: int,
    process_index: int | None = None, process_count: int | None = None,
) -> grain.DataLoaderIterator:
  """An endless, shuffled iterator over this host's share of the train split.

  Args:
    config: reads data.* (see `create_source`), data.random_flip,
      training.batch_size (global, over all hosts) and the optional
      data.worker_count (grain worker processes; default 0 = in-process).
    seed: shuffle and flip seed, an int in [0, 2**32).
    process_index: this host's index; default `jax.process_index()`.
    process_count: number of hosts; default `jax.process_count()`.

  Returns:
    A grain `DataLoaderIterator` yielding forever
    `{'image': float32 [B_local, S, S, C] in [-1, 1], 'label': int32
    [B_local]}`, B_local = training.batch_size // process_count. Each host
    reads a disjoint slice of len(split) // process_count records (the
    remainder is dropped), reshuffled every epoch. Save/restore its state
    with grain.checkpoint.CheckpointSave/CheckpointRestore in an orbax
    Composite (see the module docstring).

  Raises:
    ValueError: bad data config, batch size not divisible by process_count,
      a bad seed, or fewer records than hosts.
  """
  process_index, process_count = _host(process_index, process_count)
  local_batch = _local_batch_size(config.training.batch_size, process_count)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"The data seed must be an int in [0, 2**32); got "
                     f"{seed!r}.")
  worker_count = config.data.get("worker_count", 0)
  if not isinstance(worker_count, int) or worker_count < 0:
    raise ValueError(f"config.data.worker_count must be an int >= 0; got "
                     f"{worker_count!r}.")
  source = create_source(config, "train")
  if len(source) < process_count:
    raise ValueError(f"The train split has {len(source)} records, fewer than "
                     f"the {process_count} processes reading it.")
  if local_batch > len(source) // process_count:
    logging.warning(
        "training.batch_size=%d is larger than the train split (%d records): "
        "each batch holds some examples twice.", config.training.batch_size,
        len(source))
  shard = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count,
      drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard, shuffle=True,
      num_epochs=None, seed=int(seed))
  operations = [BindWorkerToTrainer()] if worker_count else []
  if worker_count and not flags.FLAGS.is_parsed():
    # grain's worker start-up reads its absl flags, and an unparsed absl flag
    # raises: a caller outside an absl app (a notebook, a script) got
    # UnparsedFlagAccessError at the first batch. Their defaults are right.
    flags.FLAGS.mark_as_parsed()
  if config.data.random_flip:
    operations.append(RandomFlip())
  operations += [grain.transforms.Batch(local_batch, drop_remainder=True),
                 ToModelInput()]
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=worker_count, shard_options=shard)
  return iter(loader)


class _PaddedShard:
  """This host's contiguous slice of the first `num_examples`, padded.

  Index i < end - start is example start + i with mask True (and that index
  in the split); beyond that a zero image with label 0, index -1 and mask False, so that every host yields the same
  number of batches (collectives need that) while each real example appears
  exactly once over all hosts.
  """

  def __init__(self, source: Any, start: int, end: int,
               image_shape: tuple[int, int, int]):
    self._source = source
    self._start = start
    self._count = end - start
    self._image_shape = image_shape

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if index < self._count:
      example = self._source[self._start + index]
      return {"image": example["image"], "label": np.int32(example["label"]),
              "mask": np.bool_(True), "index": np.int32(self._start + index)}
    return {"image": np.zeros(self._image_shape, np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False), "index": np.int32(-1)}


def create_eval_iterator(
    config: ml_collections.ConfigDict, *, split: str = "test",
    batch_size: int, num_examples: int | None = None,
    process_index: int | None = None, process_count: int | None = None,
) -> Iterator[Batch]:
  """A finite, ordered iterator over this host's share of an eval split.

  Host p gets the contiguous examples [p * k, min((p + 1) * k, n)) with
  k = ceil(n / process_count); all hosts yield ceil(k / B_local) batches.
  No shuffling, no flips.

  Args:
    config: reads data.* (see `create_source`).
    split: 'test' (default) or another split (see `create_source`).
    batch_size: global eval batch size over all hosts.
    num_examples: evaluate the first n examples of the split (default all).
    process_index: this host's index; default `jax.process_index()`.
    process_count: number of hosts; default `jax.process_count()`.

  Returns:
    An iterator of `{'image': float32 [B_local, S, S, C] in [-1, 1],
    'label': int32 [B_local], 'mask': bool [B_local], 'index': int32
    [B_local]}`: mask is False on padding; index is the example's index in
    the split (-1 on padding). Over all hosts, each of the n examples has mask True exactly
    once.

  Raises:
    ValueError: bad data config, batch size not divisible by process_count,
      or num_examples outside [1, len(split)].
  """
  process_index, process_count = _host(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  source = create_source(config, split)
  total = len(source)
  if num_examples is None:
    num_examples = total
  if not isinstance(num_examples, int) or not 1 <= num_examples <= total:
    raise ValueError(f"num_examples must be an int in [1, {total}] (the size "
                     f"of split {split!r}); got {num_examples!r}.")
  per_host = -(-num_examples // process_count)
  start = min(process_index * per_host, num_examples)
  end = min(start + per_host, num_examples)
  num_batches = -(-per_host // local_batch)
  dataset = (
      grain.MapDataset.range(num_batches * local_batch)
      .map(_PaddedShard(source, start, end, (config.data.image_size,
                                             config.data.image_size,
                                             config.data.channels)))
      .batch(local_batch, drop_remainder=True)
      .map(ToModelInput()))
  return iter(dataset)
