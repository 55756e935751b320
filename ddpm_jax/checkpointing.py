"""Run directories and orbax checkpoints.

A run's workdir holds

  config.json     the full config of the run (written atomically at start)
  checkpoints/    an orbax `CheckpointManager` directory; step N is
                  `checkpoints/N/{state,data}`: the `TrainState` and the grain
                  iterator state of every host, saved together.

Orbax writes each step under a temporary name and renames it when complete,
and lists only finalised steps, so a run killed mid-save resumes from the
previous complete step.
"""
import contextlib
import json
import os
import re
import sys
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import files
from ddpm_jax import parallel
from ddpm_jax import train_state as ts

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"


class CheckpointError(ValueError):
  """A workdir or checkpoint cannot be used as asked (a user error)."""


# ----------------------------------------------------------------------------
# config.json


def _tuplify(value):
  """JSON turns tuples into lists; configs use tuples (e.g. model.ch_mult)."""
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuplify(v) for k, v in value.items()}
  return value


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `workdir/config.json` atomically (temp file + rename); process 0 only."""
  if jax.process_index() != 0:
    return
  with files.atomic_write(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config a run wrote to `workdir/config.json`.

  Raises:
    CheckpointError: no such file, not JSON, or it lacks a section or a key
      that has no default (`REQUIRED_CONFIG_KEYS`).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    what = "is a file" if os.path.isfile(workdir) else f"has no {CONFIG_FILE}"
    raise CheckpointError(
        f"{workdir!r} {what}: it is not a run directory. Make one "
        "with `python -m ddpm_jax.train --workdir DIR` (training), `python -m "
        "ddpm_jax.convert --diffusers SRC --workdir DIR` (official weights) or, "
        "from Python, `checkpointing.save_pretrained`.")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  missing = _missing_config_keys(data)
  if missing:
    raise CheckpointError(
        f"{path} lacks {', '.join(missing)}: the file was edited or cut off, "
        "and the run cannot be rebuilt without them. Put them back with the "
        "values the run was trained with (configs/default.py lists every key); "
        "nothing was changed.")
  return ml_collections.ConfigDict(_tuplify(data))


# What config.json must hold: every section, and the keys that fix the model,
# the data's shape and the diffusion, which every version of configs/default.py
# had. Keys added later (model.num_heads, model.low_res_size, data.worker_count,
# optim.beta1, ...) are read with defaults: runs saved before them lack them.
REQUIRED_CONFIG_KEYS = {
    "training": (),
    "optim": (),
    "data": ("dataset", "image_size", "channels", "num_classes"),
    "diffusion": ("num_timesteps", "beta_schedule", "beta_start", "beta_end",
                  "model_mean_type", "model_var_type", "loss_type"),
    "model": ("name", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "dropout", "resamp_with_conv", "num_classes", "dtype", "remat"),
}


def _missing_config_keys(data: Any) -> list[str]:
  """The sections and required keys (`REQUIRED_CONFIG_KEYS`) `data` lacks."""
  if not isinstance(data, Mapping):
    return ["every section (it holds no JSON object)"]
  missing = []
  for section, keys in REQUIRED_CONFIG_KEYS.items():
    if not isinstance(data.get(section), Mapping):
      missing.append(f"the {section!r} section")
    else:
      missing += [f"{section}.{k}" for k in keys if k not in data[section]]
  return missing


# Keys a resumed run may change: they set logging, checkpointing, the sample
# grid, data loading or how the same computation is laid out, not what is
# computed. Any other difference to the saved config.json is refused.
RESUMABLE_CHANGES = frozenset({
    "training.num_train_steps", "training.log_every_steps",
    "training.checkpoint_every_steps", "training.sample_every_steps",
    "training.num_sample_images", "training.max_to_keep",
    "training.steps_per_call", "training.shard_params", "model.remat",
    "model.conv_algorithm", "model.attention_algorithm", "data.data_dir",
})
# Keys left out of the comparison with config.json because the restore checks
# them against the checkpoint itself, with a message naming the value to use:
# a checkpoint holding grain's state ties data.worker_count
# (`_check_data_state`); a run fed by its own iterator may change it.
_CHECKED_BY_RESTORE = frozenset({"data.worker_count"})


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'section.key': value} of a config as JSON (lists as tuples)."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flat_json(v, name))
    else:
      out[name] = v
  return out


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return _tuplify(json.loads(config.to_json_best_effort()))


def default_config() -> ml_collections.ConfigDict:
  """configs/default.py: importable, or in the checkout that holds this package.

  Raises:
    CheckpointError: neither (an install without the repository's configs/).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.isfile(os.path.join(root, "configs", "default.py")) and (
      root not in sys.path):
    sys.path.append(root)  # run from outside the checkout
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"configs/default.py is neither importable nor in {root} (an install "
        "without the repository's configs/).") from None
  return default.get_config()


def _default_values() -> dict[str, Any]:
  """configs/default.py flattened, or {} where it cannot be found."""
  try:
    return _flat_json(_config_json(default_config()))
  except CheckpointError:
    return {}


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run with a config that changes what it computes.

  Compares `config` with `workdir/config.json`. Only the keys in
  `RESUMABLE_CHANGES` may differ; a key the saved config lacks (a run made
  before the key existed) counts as configs/default.py's value, and a key the
  new config lacks is ignored.

  Raises:
    CheckpointError: naming every differing key with its saved and new value.
  """
  saved = _flat_json(_config_json(read_config(workdir)))
  new = _flat_json(_config_json(config))
  defaults = None
  diffs = []
  for key in sorted(new):
    if key in RESUMABLE_CHANGES or key in _CHECKED_BY_RESTORE:
      continue
    if key in saved:
      old = saved[key]
    else:
      if defaults is None:
        defaults = _default_values()
      if key not in defaults:
        continue
      old = defaults[key]
    if old != new[key]:
      diffs.append(f"  {key}: {old!r} (saved) -> {new[key]!r} (new)")
  if diffs:
    raise CheckpointError(
        f"{workdir} holds a run trained with another config; resuming would mix "
        f"the two. Differences to {os.path.join(workdir, CONFIG_FILE)}:\n"
        + "\n".join(diffs) + "\nUse a new --workdir, or the saved values. Only "
        f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. Nothing "
        "was changed.")


# ----------------------------------------------------------------------------
# The workdir


def check_workdir_path(workdir: str) -> None:
  """Refuses a `--workdir` that cannot be a directory, without writing anything."""
  if not str(workdir).strip():
    raise CheckpointError("--workdir is empty: name the run directory.")
  if "://" in str(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} exists and is not a directory: "
                          "name a new or existing run directory.")


def check_writable(workdir: str) -> None:
  """Creates `workdir` and `workdir/checkpoints` and writes a file into each.

  Orbax would only fail at the first save (after a 300 s timeout); this
  fails at once, naming the directory. A URL (gs://...) is not checked.

  Raises:
    CheckpointError: a directory cannot be created or written.
  """
  check_workdir_path(workdir)
  if "://" in str(workdir):
    return
  for directory in (workdir, os.path.join(workdir, CHECKPOINT_DIR)):
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise CheckpointError(f"--workdir {workdir}: {directory} exists and is not a "
                            "directory; checkpoints are written there.")
    try:
      files.check_can_write(directory)
    except OSError as e:
      raise CheckpointError(f"--workdir {workdir}: cannot write to {directory}: "
                            f"{e.strerror or e}.") from None


def check_shared_workdir(workdir: str) -> None:
  """Checks that every process of a multi-process run sees the same `workdir`.

  The processes write each checkpoint together; a workdir that is local to
  each host would fail only at the first save (by default after 10,000
  steps). Process 0 writes a file there that every process must then see.
  Collective: every process calls it. A URL (gs://...) is not checked.

  Raises:
    CheckpointError: on every process, naming those that do not see the file.
  """
  if jax.process_count() == 1 or "://" in str(workdir):
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  nonce = int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(2**31))))
  marker = os.path.join(workdir, f".shared-check-{nonce}")
  if jax.process_index() == 0:
    with open(marker, "w") as f:
      f.write("written by process 0 of this run; removed when all saw it\n")
  multihost_utils.sync_global_devices("ddpm_jax: marker written")
  seen = multihost_utils.process_allgather(np.int32(os.path.exists(marker)))
  multihost_utils.sync_global_devices("ddpm_jax: marker seen")
  if jax.process_index() == 0:
    os.remove(marker)
  blind = [i for i, s in enumerate(np.asarray(seen).ravel()) if not s]
  if blind:
    raise CheckpointError(
        f"--workdir {workdir} is not the same directory on every process: "
        f"process(es) {', '.join(map(str, blind))} do not see the file process "
        "0 wrote there. All processes write each checkpoint together: use a "
        "file system every host mounts at the same path (NFS, Filestore, a "
        "gcsfuse mount).")


# ----------------------------------------------------------------------------
# The checkpoint manager


def checkpoint_dir(workdir: str) -> epath.Path:
  """`workdir/checkpoints`, absolute: orbax refuses relative paths (a URL stays as is)."""
  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / CHECKPOINT_DIR


def create_manager(workdir: str, *, max_to_keep: Optional[int] = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints` (async saves when writable).

  Args:
    workdir: the run directory.
    max_to_keep: checkpoints kept on disk, >= 1 (None keeps all; orbax
      would delete every checkpoint, old ones included, for 0).
    read_only: for inference: never creates or deletes anything.
  """
  directory = checkpoint_dir(workdir)
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0)
    # Item handlers named up front so metadata can be read before any save.
    return ocp.CheckpointManager(
        directory, options=options,
        item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()})
  if max_to_keep is not None and max_to_keep < 1:
    raise CheckpointError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}.")
  import grain  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                     DATA_ITEM: grain.checkpoint.CheckpointHandler()})


def existing_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps in `workdir`, oldest first (temp dirs excluded)."""
  if not checkpoint_dir(workdir).exists():
    return []
  manager = create_manager(workdir, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def save(manager: ocp.CheckpointManager, state: ts.TrainState,
         data_iterator: Any = None) -> None:
  """Starts an async save of `state` (and the grain iterator) at `state.step`.

  The iterator state is read now, synchronously, so it matches `state`.
  Call `manager.wait_until_finished()` before exiting.
  """
  args = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    import grain  # pylint: disable=g-import-not-at-top
    args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(**args), force=True)


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointError if a background save that has finished failed.

  `save` returns before the arrays are written; a full disk or a lost mount
  shows up here, so that training stops at once instead of running on
  (possibly for thousands of steps) towards saves that cannot succeed.
  """
  if manager.is_saving_in_progress():
    return
  try:
    # Returns at once for a finished save; re-raises the error of a failed one.
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    # orbax re-raises whatever the writer thread raised (OSError, ValueError
    # from TensorStore, ...).
    steps = sorted(manager.all_steps())
    resume = (f"it resumes from step {steps[-1]}, the newest complete one"
              if steps else "no step was saved yet, so it starts afresh")
    raise CheckpointError(
        f"Writing a checkpoint into {manager.directory} failed: "
        f"{_first_line(e)}. Training stopped. Fix the cause (e.g. free disk "
        f"space) and run the same command again: {resume}.") from e


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any = None, worker_count: Optional[int] = None
            ) -> tuple[ts.TrainState, Any]:
  """Restores step `step` into the shapes/shardings of `abstract_state`.

  Args:
    manager: from `create_manager`.
    step: an existing step.
    abstract_state: `TrainState` of `jax.ShapeDtypeStruct`s with `.sharding`
      set (see `abstract_with_shardings`).
    data_iterator: a fresh grain iterator; its state is set from the
      checkpoint when the step holds one (a `save_pretrained` step does not).
    worker_count: the iterator's grain worker processes
      (`config.data.worker_count`), checked against the saved state's with a
      message naming the setting; None leaves the check to grain.
  Returns:
    (state, data_iterator).
  Raises:
    CheckpointError: the step cannot be read (saying how to resume from the
      one before), or its input-pipeline state does not fit this run.
  """
  args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
  has_data = (manager.directory / str(step) / DATA_ITEM).exists()
  if data_iterator is not None and not has_data and step > 0:
    # A fresh iterator would start the data over: not the batches an
    # uninterrupted run sees.
    raise _damaged(manager, step, f"it has no {DATA_ITEM}/ folder, the input "
                   "pipeline's position (a run fed by its own data iterator "
                   "from Python resumes only that way)", resume=True)
  with _reading(manager, step, resume=True):
    if data_iterator is not None and has_data:
      import grain  # pylint: disable=g-import-not-at-top
      _check_data_state(manager.directory / str(step) / DATA_ITEM, step,
                        worker_count)
      args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  if data_iterator is not None and has_data:
    data_iterator = restored[DATA_ITEM]
  return restored[STATE_ITEM], data_iterator


def _check_data_state(data_dir: Any, step: int,
                      worker_count: Optional[int]) -> None:
  """grain saves the input pipeline's position per process and per worker.

  The number of processes and `config.data.worker_count` must match those of
  the run that saved `step` (grain's own error would not say which setting
  to change).
  """
  n = jax.process_count()
  path = data_dir / f"process_{jax.process_index()}-of-{n}.json"
  if not path.exists():
    saved = sorted({name.split("-of-")[-1].split(".")[0] for name in
                    (p.name for p in data_dir.iterdir()) if "-of-" in name})
    raise CheckpointError(
        f"Step {step} was saved by {' or '.join(saved) or 'another number of'} "
        f"process(es), and this run has {n}: the input pipeline's position is "
        "saved per process. Resume with the same number of processes (e.g. "
        "launch/local.sh -n N), or train into a new --workdir.")
  saved = json.loads(path.read_text()).get("worker_count")
  if worker_count is not None and saved is not None and saved != worker_count:
    raise CheckpointError(
        f"Step {step} was saved with config.data.worker_count={saved}, and "
        f"this run has {worker_count}: grain saves the input pipeline's position "
        f"per worker. Resume with --config.data.worker_count={saved}, or "
        "train into a new --workdir.")


def restore_weights(workdir: str, step: int,
                    abstract_state: Any) -> tuple[Any, Any]:
  """(params, ema_params) of step `step`, into `abstract_state`'s shardings.

  Reads nothing else: for fine-tuning a step-0 run (convert,
  `save_pretrained`), whose optimiser state was shaped by the config that
  wrote it (clipping or not), and holds no training.

  Raises:
    CheckpointError: the step cannot be read (`_damaged`).
  """
  names = ("params", "ema_params")
  manager = create_manager(workdir, read_only=True)
  try:
    restored = _restore_part(
        manager, step, {n: getattr(abstract_state, n) for n in names},
        resume=True)
  finally:
    manager.close()
  return tuple(restored[n] for n in names)


def _restore_part(manager: ocp.CheckpointManager, step: int,
                  target: Mapping[str, Any], *, resume: bool) -> dict[str, Any]:
  """The subtrees of step `step`'s train state that `target` names.

  Args:
    manager: a read-only manager (`create_manager(..., read_only=True)`):
      its handlers restore part of a tree.
    step: the step.
    target: {name: tree of `jax.ShapeDtypeStruct`s with `.sharding`}, e.g.
      {'ema_params': ...}; nothing else is read.
    resume: the advice of `_damaged` if the step cannot be read.
  """
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
  with _reading(manager, step, resume=resume):
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)}))
  return restored[STATE_ITEM]


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_tree, shardings)


# ----------------------------------------------------------------------------
# Damaged checkpoints


def _first_line(error: BaseException) -> str:
  """The first line of `error`, less TensorStore's spec (a long JSON)."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line.split(" [tensorstore_spec=")[0].rstrip(".")


def _damaged(manager: ocp.CheckpointManager, step: int, problem: str, *,
             resume: bool) -> CheckpointError:
  """The error for step `step`, which cannot be read, saying what to do.

  Args:
    manager: the run's manager.
    step: the unreadable step.
    problem: what is wrong, e.g. the first line of orbax's error.
    resume: advice for `train` (move the step's folder aside; the run then
      resumes from the step before), else for sample/evaluate (`--step N`).
  """
  directory = manager.directory
  steps = sorted(manager.all_steps())
  older = [s for s in steps if s < step]
  folder = directory / str(step)
  move = f"`mv {folder} {directory.parent / f'broken_step_{step}'}`"
  if resume:
    then = (f"resume from step {older[-1]}" if older else
            "train from scratch in this --workdir (or use a new one)")
    advice = f"To {then}, move its folder out of {directory}: {move}."
  elif len(steps) > 1:
    advice = (f"Load {'an older' if older else 'another'} step with --step N "
              f"(existing steps: {', '.join(map(str, steps))}), or move the "
              f"folder out of {directory} ({move}).")
  else:
    advice = (f"It is the only checkpoint: restore {folder} from a copy, or "
              "train the run again.")
  return CheckpointError(
      f"Step {step} in {directory} could not be read: {problem}. Its files are "
      "damaged or unreadable (cut short or removed, e.g. by a full disk or an "
      f"interrupted copy). {advice} Nothing was deleted.")


# TensorStore reports a file it cannot read as ValueError('CODE: ...').
_TENSORSTORE_ERROR = re.compile(r"[A-Z][A-Z_]+: ")


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int, *, resume: bool):
  """Turns errors reading step `step`'s files into `_damaged`'s error.

  Other errors (a tree that does not match the checkpoint, ...) pass.
  """
  try:
    yield
  except (OSError, json.JSONDecodeError) as e:
    raise _damaged(manager, step, _first_line(e), resume=resume) from e
  except ValueError as e:
    if isinstance(e, CheckpointError) or not _TENSORSTORE_ERROR.match(str(e)):
      raise
    raise _damaged(manager, step, _first_line(e), resume=resume) from e


# ----------------------------------------------------------------------------
# Shape checks


def _flatten(tree: Any, prefix: str = "") -> dict[str, tuple]:
  """{'a/b/c': shape} for a nested mapping of arrays or metadata."""
  out = {}
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
  else:
    out[prefix] = tuple(getattr(tree, "shape", ()))
  return out


def _saved_state_tree(manager: ocp.CheckpointManager, step: int, *,
                      resume: bool) -> Mapping[str, Any]:
  """The tree of `step`'s train state (array metadata; reads no array).

  Raises:
    CheckpointError: the step has no readable train state (`_damaged`).
  """
  if not (manager.directory / str(step) / STATE_ITEM).exists():
    raise _damaged(manager, step, f"it has no {STATE_ITEM}/ folder (the train "
                   "state)", resume=resume)
  with _reading(manager, step, resume=resume):
    item = manager.item_metadata(step)[STATE_ITEM]
  if item is None:
    raise _damaged(manager, step, f"its {STATE_ITEM}/ folder holds no train "
                   "state orbax can read (is state/_METADATA missing?)", resume=resume)
  return getattr(item, "tree", item)


def describe_mismatch(expected: Any, saved: Any, *, limit: int = 5) -> Optional[str]:
  """Human-readable difference of two param trees' shapes, or None if equal."""
  a, b = _flatten(expected), _flatten(saved)
  lines = []
  for name in sorted(set(a) | set(b)):
    if name not in b:
      lines.append(f"  {name}: expected {a[name]}, missing in checkpoint")
    elif name not in a:
      lines.append(f"  {name}: in checkpoint {b[name]}, not in the model")
    elif a[name] != b[name]:
      lines.append(f"  {name}: model {a[name]} vs checkpoint {b[name]}")
  if not lines:
    return None
  more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return "\n".join(lines[:limit]) + more


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                     workdir: str = "") -> None:
  """Raises `CheckpointError` if step `step` holds params of other shapes.

  For resuming: an unreadable step's error says how to resume from the one
  before.
  """
  saved = _saved_state_tree(manager, step, resume=True)
  diff = describe_mismatch(abstract_params, saved.get("params", {}))
  if diff:
    raise CheckpointError(
        f"The checkpoint at step {step} in {workdir or manager.directory} holds a "
        f"model of a different shape than the config asks for:\n{diff}\n"
        "Use a new --workdir, or the config the run was trained with "
        f"({os.path.join(workdir, CONFIG_FILE) if workdir else CONFIG_FILE}). "
        "Nothing was changed.")


# ----------------------------------------------------------------------------
# Inference entry points


def save_pretrained(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """Writes a complete step-0 run whose params and EMA params are `params`.

  train (fine-tuning), sample and evaluate then load `workdir` like any run.
  The optimiser state is freshly initialised.

  The parameters are stored as float32 (as training keeps them), whatever
  their dtype. `config.json` is written last: a failed save leaves no run
  that looks complete.

  Raises:
    CheckpointError: `workdir` is a file or already holds a run (a
      `config.json` or checkpoints), or `params` do not have the shapes of
      the model `config` describes.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"{workdir} is a file; save_pretrained writes a new "
                          "run into a directory: choose another workdir.")
  held = [n for n in (CONFIG_FILE, CHECKPOINT_DIR)
          if os.path.exists(os.path.join(workdir, n))]
  if held:
    steps = existing_steps(workdir) if os.path.isdir(checkpoint_dir(workdir)) else []
    raise CheckpointError(
        f"{workdir} already holds a run ({', '.join(held)}"
        + (f"; checkpoints at steps {steps}" if steps else "")
        + "); save_pretrained writes a new run: choose an empty workdir.")
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config)
  rng = jax.random.PRNGKey(config.training.seed)
  abstract = jax.eval_shape(lambda: ts.create_train_state(config, rng, model))
  diff = describe_mismatch(abstract.params, params)
  if diff:
    raise CheckpointError(
        f"The given params do not match the model of the config:\n{diff}")
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  state = ts.create_train_state(config, rng, model, params=params)
  manager = create_manager(workdir, max_to_keep=None)
  try:
    save(manager, state)
    manager.wait_until_finished()
  finally:
    manager.close()
  write_config(workdir, config)


def load_params(workdir: str, *, step: Optional[int] = None, which: str = "ema",
                sharding: Optional[jax.sharding.Sharding] = None
                ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """Loads one parameter tree of a run for inference.

  Only the chosen subtree is read: no optimiser state, no data iterator.

  Args:
    workdir: a run directory (config.json + checkpoints/).
    step: the step to load; None for the newest complete one.
    which: 'ema' (the EMA parameters, used for sampling) or 'params'.
    sharding: where the arrays go; default replicated over all devices.
  Returns:
    (config, params, step): the run's config, a float32 param pytree, the step.
  """
  keys = {"ema": "ema_params", "params": "params"}
  if which not in keys:
    raise CheckpointError(f"which={which!r}: must be one of {sorted(keys)}.")
  config = read_config(workdir)
  steps = existing_steps(workdir)
  if not steps:
    raise CheckpointError(
        f"No complete checkpoint in {checkpoint_dir(workdir)}: train with "
        f"`python -m ddpm_jax.train --workdir {workdir}` (it resumes there), or "
        "write weights with `python -m ddpm_jax.convert` or "
        "`checkpointing.save_pretrained`.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(
        f"Step {step} does not exist in {checkpoint_dir(workdir)}; existing steps: {steps}.")
  if sharding is None:
    sharding = NamedSharding(parallel.create_mesh(), P())
  manager = create_manager(workdir, read_only=True)
  try:
    saved = _saved_state_tree(manager, step, resume=False)[keys[which]]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
    restored = _restore_part(manager, step, {keys[which]: target}, resume=False)
  finally:
    manager.close()
  return config, restored[keys[which]], step
