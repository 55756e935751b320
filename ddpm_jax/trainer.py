"""The training loop: `train_and_evaluate(config, workdir)`.

Creates (or resumes) the state over a mesh of every device, feeds the jitted
train step, fetches metrics one call late so dispatch stays asynchronous,
logs (console, metrics.jsonl, TensorBoard; process 0 only), samples grids
of the EMA parameters, and saves orbax checkpoints. SIGTERM saves the current
step and returns; the first Ctrl-C saves it and raises KeyboardInterrupt; a
NaN/Inf loss or gradient raises, naming the step, with the last good
checkpoint left as it was.
"""
import inspect
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ddpm_jax import checkpointing
from ddpm_jax import files
from ddpm_jax import image_grid
from ddpm_jax import parallel
from ddpm_jax import train_state as ts
from ddpm_jax import train_step as train_step_lib


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm became NaN or Inf."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for training settings that cannot work."""
  t = config.training
  k = int(t.steps_per_call)
  if k < 1:
    raise ValueError(f"training.steps_per_call must be >= 1, got {k}.")
  for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
               "sample_every_steps"):
    value = int(t[name])
    if name == "sample_every_steps" and value < 0:
      raise ValueError(f"training.{name} must be >= 1, or 0 for no sample "
                       f"grids; got {value}.")
    if name != "sample_every_steps" and value < 1:
      raise ValueError(f"training.{name} must be >= 1, got {value}.")
    if value and value % k:
      raise ValueError(f"training.{name}={value} must be a multiple of "
                       f"training.steps_per_call={k}.")
  if int(t.sample_every_steps) > 0 and int(t.num_sample_images) < 1:
    raise ValueError(
        f"training.num_sample_images must be >= 1 for the sample grid every "
        f"{t.sample_every_steps} steps, got {t.num_sample_images} (set "
        "training.sample_every_steps=0 for no grids).")
  m = config.model
  classes = int(m.num_classes)
  classifier = m.name == "classifier"  # `models.is_classifier`
  if not classifier and classes:
    # Labels past the class embedding would index out of it, and the id
    # `classes` means "no class" (classifier-free guidance).
    if int(config.data.num_classes) != classes:
      raise ValueError(
          f"model.num_classes={classes} but the data carries "
          f"data.num_classes={config.data.num_classes} classes: a "
          "class-conditional model is trained on every class of its data set "
          "(set both alike, or model.num_classes=0 for an unconditional one).")
  if float(t.label_dropout) and classifier:
    raise ValueError(
        f"training.label_dropout={t.label_dropout} applies to a "
        "class-conditional diffusion model, not to a classifier; set it to 0.")
  if float(t.label_dropout) and not classes:
    raise ValueError(
        f"training.label_dropout={t.label_dropout} applies to a "
        "class-conditional model only, and model.num_classes=0; set "
        "model.num_classes to the data's classes or label_dropout to 0.")
  if float(m.get("noise_aug_max", 0.0)) and not int(m.get("low_res_size", 0)):
    raise ValueError(
        f"model.noise_aug_max={m.noise_aug_max} applies to a super-resolution "
        "model only, and model.low_res_size=0; set model.low_res_size or "
        "noise_aug_max to 0.")
  o = config.optim
  if o.grad_clip is not None and float(o.grad_clip) < 0:
    raise ValueError(f"optim.grad_clip must be >= 0 (0: no clipping), got "
                     f"{o.grad_clip}.")
  for name in ("beta1", "beta2", "ema_decay"):
    # ema_decay 1 would keep the EMA parameters, which sample, at the
    # initialisation; Adam's betas at 1 never forget.
    if not 0.0 <= float(o[name]) < 1.0:
      raise ValueError(f"optim.{name} must be in [0, 1), got {o[name]}.")
  if not float(o.eps) > 0.0:
    raise ValueError(f"optim.eps must be > 0, got {o.eps}.")
  # orbax deletes every checkpoint, old ones included, when asked to keep 0.
  if t.max_to_keep is not None and int(t.max_to_keep) < 1:
    raise ValueError(f"training.max_to_keep must be >= 1 (None keeps every "
                     f"checkpoint), got {t.max_to_keep}.")


def format_duration(seconds: float) -> str:
  """'HH:MM:SS', with days in front past 24 h: '2d 03:19:42'."""
  total = int(round(max(seconds, 0.0)))
  days, rest = divmod(total, 86400)
  hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
  return f"{days}d {hms}" if days else hms


def _crossed(step: int, prev: int, every: int) -> bool:
  """True if a multiple of `every` lies in (prev, step]."""
  return every > 0 and step // every > prev // every


class _StopSignals:
  """SIGTERM (pre-emption) and a first Ctrl-C become a flag the loop checks.

  The loop then saves the current step and stops: exit 0 after SIGTERM, so a
  scheduler can restart the run; KeyboardInterrupt after Ctrl-C, as Ctrl-C
  does anywhere. A second Ctrl-C interrupts at once (the previous handler is
  back). A SIGINT that the process ignores (a background job) stays ignored.
  """

  def __init__(self):
    self.requested = False
    self.interrupted = False  # Ctrl-C, not SIGTERM
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if signum == signal.SIGINT:
      self.interrupted = True
      signal.signal(signal.SIGINT, self._old.pop(signal.SIGINT))
      print("Ctrl-C: saving the current step, then stopping "
            "(Ctrl-C again stops without saving).", file=sys.stderr, flush=True)

  @property
  def name(self) -> str:
    return "Ctrl-C" if self.interrupted else "SIGTERM"

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def any_process(self) -> bool:
    """All hosts must agree to save together: OR the flag over processes."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without records past `step` (a crash's leftovers)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue  # a line cut off by a crash
    if record_step <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if keep != lines:
    with files.atomic_write(path, "w") as f:
      f.writelines(keep)


class _MetricWriter:
  """metrics.jsonl + TensorBoard scalars/images; a no-op off process 0.

  `start_step`: the step the run starts (or resumes) from; records of later
  steps, written before a crash, are dropped so that none appears twice.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.active:
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_records_after(path, start_step)
      self._jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        # purge_step: TensorBoard hides the events of steps >= it written before.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1)
      except ImportError:  # optional: metrics.jsonl still holds everything
        self._tb = None

  def scalars(self, step: int, values: dict) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"train/{k}", v, step)
      self._tb.flush()

  def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    if self.active and self._tb is not None:
      self._tb.add_image(name, grid_uint8, step, dataformats="HWC")
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _summarise(window: list, batch_size: int, seconds: float, step: int,
               num_train_steps: int, untimed_steps: int = 0) -> dict:
  """Averages a logging window of per-step host metrics.

  The throughput counts the window's steps less `untimed_steps` (the first
  call's, which ran before `seconds` started: its time was compilation);
  without a timed step it is left out.
  """
  stacked = {k: np.concatenate([np.atleast_1d(m[k]) for m in window]) for k in window[0]}
  n = len(stacked["loss"])
  out = {k: float(np.mean(stacked[k])) for k in ("loss", "grad_norm", "param_norm")}
  if "accuracy" in stacked:  # classifier runs
    out["accuracy"] = float(np.mean(stacked["accuracy"]))
  out["lr"] = float(stacked["lr"][-1])
  for i in range(train_step_lib.NUM_QUARTILES):
    count = float(np.sum(stacked[f"loss_q{i}_count"]))
    if count > 0:
      out[f"loss_q{i}"] = float(np.sum(stacked[f"loss_q{i}_sum"]) / count)
  timed = n - untimed_steps
  if timed > 0:
    steps_per_sec = timed / max(seconds, 1e-9)
    out["steps_per_sec"] = steps_per_sec
    out["images_per_sec"] = steps_per_sec * batch_size
    out["eta_sec"] = (num_train_steps - step) / max(steps_per_sec, 1e-9)
  return out


def _console_line(step: int, num_train_steps: int, summary: dict) -> str:
  line = f"step {step}/{num_train_steps}  loss {summary['loss']:.5f}"
  if "accuracy" in summary:
    line += f"  accuracy {summary['accuracy']:.4f}"
  if "images_per_sec" in summary:
    line += (f"  {summary['images_per_sec']:.1f} img/s  "
             f"ETA {format_duration(summary['eta_sec'])}")
  return line


def _check_finite(metrics: dict, first_step: int,
                  last_saved: Callable[[], Optional[int]],
                  grad_clip: Optional[float]) -> None:
  """Raises NonFiniteError naming the first update with a NaN/Inf.

  Args:
    metrics: host metrics of one call ([K] or scalars).
    first_step: state.step before the call (updates are numbered from 1).
    last_saved: gives the newest saved step, None if none (asked only on
      failure).
    grad_clip: `optim.grad_clip` (0 or None: no clipping), for the advice.
  """
  loss = np.atleast_1d(metrics["loss"])
  gnorm = np.atleast_1d(metrics["grad_norm"])
  bad = ~(np.isfinite(loss) & np.isfinite(gnorm))
  if bad.any():
    i = int(np.argmax(bad))
    saved = last_saved()
    kept = ("no checkpoint was saved yet" if saved is None else
            f"the last good checkpoint (step {saved}) is kept")
    tries = ["a lower optim.lr"]
    tries.append(f"a smaller optim.grad_clip (now {grad_clip})" if grad_clip
                 else "optim.grad_clip > 0")
    raise NonFiniteError(
        f"Non-finite training at step {first_step + i + 1}: loss={loss[i]}, "
        f"grad_norm={gnorm[i]}. The state of this step was not saved; {kept}. "
        f"Try {', '.join(tries)} or a longer optim.warmup_steps.")


# The grid's chain runs in about this many compiled chunks, so that SIGTERM
# is answered between them rather than after the whole grid.
_GRID_CHUNKS = 20


def make_sample_fn(config: ml_collections.ConfigDict, model: Any, diffusion: Any, mesh):
  """`sample(ema_params, rng, should_stop=None) -> [N, H, W, C]` (ancestral sampler).

  The chain (`sampling.p_sample_loop`'s samples) runs in jitted chunks;
  `should_stop()` is called before each and, when it returns True, `sample`
  returns None at once.
  """
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  n = int(config.training.num_sample_images)
  shape = (n, config.data.image_size, config.data.image_size, config.data.channels)
  num_classes = int(config.model.num_classes)
  # Conditional models: cycle through the classes so each grid column is one class.
  y = jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes > 0 else None
  replicated = parallel.replicated(mesh)
  prior = jax.jit(lambda rng: sampling.prior_sample(diffusion, rng, shape),
                  out_shardings=replicated)

  def chunk_fn(params, x, rng, t_start, t_end):
    def model_fn(x, t):
      return model.apply({"params": params}, x, t, y, train=False)
    return sampling.sample_steps(diffusion, model_fn, x, rng, t_start, t_end,
                                 sampler="ancestral", clip_denoised=True)

  chunk = jax.jit(chunk_fn, out_shardings=replicated)
  steps = int(diffusion.num_timesteps)
  size = max(1, -(-steps // _GRID_CHUNKS))

  def sample(params, rng, should_stop=None):
    x = prior(rng)
    # Process 0 shows the chain's progress: on a CPU a grid takes minutes.
    with tqdm(total=steps, unit="step", desc="sample grid", leave=False,
              disable=jax.process_index() != 0) as bar:
      for hi in range(steps, 0, -size):
        if should_stop is not None and should_stop():
          return None
        x = chunk(params, x, rng, hi, max(hi - size, 0))
        x.block_until_ready()
        bar.update(hi - max(hi - size, 0))
    return x

  return sample


def _sample_grid(config, sample_fn, params, rng, diffusion, should_stop):
  """The grid's samples as a host array, or None when `should_stop` cut it short.

  A custom `sample_fn(params, rng)` without a `should_stop` argument runs to
  the end.
  """
  logging.info("sampling a grid of %d images (%d steps)...",
               int(config.training.num_sample_images), int(diffusion.num_timesteps))
  try:
    accepts_stop = "should_stop" in inspect.signature(sample_fn).parameters
  except (TypeError, ValueError):  # a callable without a signature
    accepts_stop = False
  if accepts_stop:
    samples = sample_fn(params, rng, should_stop=should_stop)
  else:
    samples = sample_fn(params, rng)
  return None if samples is None else np.asarray(jax.device_get(samples))


def _next_batch(data_iterator: Iterator, steps_per_call: int) -> dict:
  if steps_per_call == 1:
    return next(data_iterator)
  batches = [next(data_iterator) for _ in range(steps_per_call)]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _finish_saves(manager) -> None:
  """Waits for the background save, still under `_StopSignals`' handlers.

  A SIGTERM during the last save then cannot kill the process with its
  checkpoint half-written (the default handler is back only afterwards).
  """
  manager.wait_until_finished()
  checkpointing.check_saves(manager)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model: Any = None,
    diffusion: Any = None,
    data_iterator: Optional[Iterator] = None,
    losses_fn: Any = None,
    sample_fn: Any = None,
) -> ts.TrainState:
  """Trains (resuming from the newest complete checkpoint in `workdir`).

  Args:
    config: the full run config (see configs/default.py).
    workdir: run directory: config.json, checkpoints/, metrics.jsonl,
      tensorboard/, samples/step_N.png.
    model, diffusion, data_iterator, losses_fn, sample_fn: overrides for
      tests and custom code; by default built from the config
      (`models.create_model`, `models.create_diffusion`,
      `input_pipeline.create_train_iterator`, `diffusion.training_losses`,
      the ancestral sampler). A custom `data_iterator` is not checkpointed.

  Returns:
    the final state (at num_train_steps, or where SIGTERM stopped it); a run
    already at or past num_train_steps is returned as restored, and nothing
    in `workdir` changes.

  Raises:
    ValueError (incl. checkpointing.CheckpointError): bad config or workdir;
    NonFiniteError: NaN/Inf loss or gradient norm;
    KeyboardInterrupt: Ctrl-C, after saving the current step (a second Ctrl-C
      does not wait for the save).
  """
  parallel.configure_jax()
  validate_config(config)
  checkpointing.check_workdir_path(workdir)
  mesh = parallel.create_mesh()
  batch_size = int(config.training.batch_size)
  parallel.check_batch_size(batch_size, mesh)
  steps_per_call = int(config.training.steps_per_call)
  num_train_steps = int(config.training.num_train_steps)
  seed = int(config.training.seed)

  if model is None or diffusion is None:
    from ddpm_jax import models  # pylint: disable=g-import-not-at-top
    model = model if model is not None else models.create_model(config)
    diffusion = diffusion if diffusion is not None else models.create_diffusion(config)
  checkpoint_data = data_iterator is None
  if data_iterator is None:
    from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    data_iterator = input_pipeline.create_train_iterator(config, seed=seed)

  rng = jax.random.PRNGKey(seed)
  init_fn = lambda key: ts.create_train_state(config, key, model)  # noqa: E731
  abstract = jax.eval_shape(init_fn, rng)
  shardings = parallel.state_shardings(abstract, mesh, bool(config.training.shard_params))

  # Check the workdir before writing anything into it (or compiling).
  if (os.path.isfile(os.path.join(workdir, checkpointing.CONFIG_FILE))
      and os.path.isdir(checkpointing.checkpoint_dir(workdir))):
    steps = checkpointing.existing_steps(workdir)
    # A step-0 run (convert, save_pretrained) holds no training yet: any
    # config may fine-tune it.
    if steps and steps[-1] > 0:
      checkpointing.check_resume_config(workdir, config)
  checkpointing.check_writable(workdir)
  checkpointing.check_shared_workdir(workdir)
  max_to_keep = config.training.max_to_keep
  manager = checkpointing.create_manager(
      workdir, max_to_keep=None if max_to_keep is None else int(max_to_keep))
  writer = None
  try:
    latest = manager.latest_step()
    if latest == 0:
      # A step-0 run (convert, save_pretrained) holds weights, no training:
      # any config may fine-tune it, so its optimiser state, shaped by the
      # config that wrote it, is not read.
      checkpointing.check_compatible(manager, latest, abstract.params, workdir)
      params, ema_params = checkpointing.restore_weights(
          workdir, 0, checkpointing.abstract_with_shardings(abstract, shardings))
      state = jax.jit(init_fn, out_shardings=shardings)(rng).replace(
          params=params, ema_params=ema_params)
      logging.info("Fine-tuning the weights of %s (step 0).", workdir)
    elif latest is not None:
      checkpointing.check_compatible(manager, latest, abstract.params, workdir)
      state, restored_iter = checkpointing.restore(
          manager, latest, checkpointing.abstract_with_shardings(abstract, shardings),
          data_iterator if checkpoint_data else None,
          worker_count=config.data.get("worker_count", 0))
      if checkpoint_data:
        data_iterator = restored_iter
      logging.info("Resumed from %s at step %d.", checkpointing.checkpoint_dir(workdir), latest)
    else:
      state = jax.jit(init_fn, out_shardings=shardings)(rng)
      logging.info("Starting a new run in %s.", workdir)
    step = int(jax.device_get(state.step))
    if step >= num_train_steps:
      # Before anything is written: config.json keeps the run's step count.
      logging.info("Step %d >= num_train_steps=%d: nothing to train; %s is "
                   "unchanged.", step, num_train_steps, workdir)
      return state
    logging.info(
        "%s parameters; %d %s device(s) in %d process(es); batch %d (%d per "
        "device), %d step(s) per call; data %s; steps %d to %d.",
        f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
        mesh.size, jax.devices()[0].platform, jax.process_count(), batch_size,
        batch_size // mesh.size, steps_per_call, config.data.dataset, step + 1,
        num_train_steps)
    checkpointing.write_config(workdir, config)
    writer = _MetricWriter(workdir, step)

    step_fn = train_step_lib.make_train_step(config, model, diffusion, losses_fn)
    p_train_step = train_step_lib.jit_train_step(step_fn, mesh, shardings, steps_per_call)
    batch_sharding = parallel.batch_sharding(mesh, 1 if steps_per_call > 1 else 0)
    # A classifier does not generate, and a super-resolution model needs
    # low-resolution inputs: `python -m ddpm_jax.sample` draws from those.
    generates = (config.model.name != "classifier"
                 and not int(config.model.get("low_res_size", 0)))
    if sample_fn is None and config.training.sample_every_steps > 0 and generates:
      sample_fn = make_sample_fn(config, model, diffusion, mesh)
    elif sample_fn is None and config.training.sample_every_steps > 0:
      logging.info("No periodic sample grid for model.name=%r, "
                   "model.low_res_size=%s.", config.model.name,
                   config.model.get("low_res_size", 0))
    sample_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # not a training key

    save_iter = data_iterator if checkpoint_data else None
    pending = None  # (state.step before the call, device metrics) of the last call
    # The throughput window starts once the first call (compilation) is done.
    window, window_start, untimed = [], time.time(), steps_per_call
    first_call = True

    def flush():
      """Fetch the last call's metrics (blocks on it) and check them."""
      nonlocal pending
      if pending is not None:
        first, m = pending
        pending = None
        host = jax.device_get(m)
        _check_finite(host, first, manager.latest_step, config.optim.grad_clip)
        window.append(host)

    with _StopSignals() as stop_signals:
      while step < num_train_steps:
        batch = parallel.global_batch(_next_batch(data_iterator, steps_per_call),
                                      batch_sharding, batch_size,
                                      1 if steps_per_call > 1 else 0)
        if first_call:
          logging.info("compiling the train step...")
          compile_start = time.time()
        state, metrics = p_train_step(state, batch)
        if first_call:
          first_call = False
          jax.block_until_ready(metrics)
          window_start = time.time()
          logging.info("compiled and ran the first step in %.1f s.",
                       window_start - compile_start)
        prev, step = step, step + steps_per_call
        flush()  # the previous call's metrics; this call keeps running
        pending = (prev, metrics)

        if _crossed(step, prev, config.training.log_every_steps) or step == num_train_steps:
          flush()
          now = time.time()
          summary = _summarise(window, batch_size, now - window_start, step,
                               num_train_steps, untimed)
          window, window_start, untimed = [], now, 0
          writer.scalars(step, summary)
          if jax.process_index() == 0:
            logging.info("%s", _console_line(step, num_train_steps, summary))
          checkpointing.check_saves(manager)  # a failed save stops the run now

        stop = stop_signals.any_process()
        saved = False
        if (stop or step == num_train_steps
            or _crossed(step, prev, config.training.checkpoint_every_steps)):
          flush()  # never save a state whose metrics were not checked
          save_start = time.time()
          checkpointing.check_saves(manager)
          checkpointing.save(manager, state, save_iter)
          saved = True
          logging.info("Saved checkpoint at step %d.", step)
          window_start += time.time() - save_start  # not training time

        # Pre-empted: no grid (it would outlast the grace period).
        if (not stop and sample_fn is not None
            and _crossed(step, prev, config.training.sample_every_steps)):
          flush()
          grid_start = time.time()
          samples = _sample_grid(config, sample_fn, state.ema_params, sample_rng,
                                 diffusion, stop_signals.any_process)
          if samples is None:
            logging.warning("%s during the sample grid of step %d: grid skipped.",
                            stop_signals.name, step)
            stop = True
          elif jax.process_index() == 0:
            grid_path = os.path.join(workdir, "samples", f"step_{step}.png")
            grid = image_grid.save_image_grid(
                samples, grid_path, upscale=max(1, 64 // int(config.data.image_size)))
            writer.image(step, "samples", grid)
            logging.info("Wrote %s (%.0f s).", grid_path, time.time() - grid_start)
          window_start += time.time() - grid_start  # not training time

        if stop:
          if not saved:
            flush()
            checkpointing.save(manager, state, save_iter)
          _finish_saves(manager)
          logging.warning("%s: saved step %d, stopping.", stop_signals.name, step)
          if stop_signals.interrupted:
            raise KeyboardInterrupt
          break
      else:
        _finish_saves(manager)
        logging.info("Finished: step %d of %d in %s.", step, num_train_steps, workdir)
    return state
  finally:
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
