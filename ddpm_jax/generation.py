"""Drawing many samples from a trained model: batches, sharding, progress.

Sample i depends only on the seed and i: example i's chain runs on the key
`fold_in(PRNGKey(seed), i)`, whatever the batch size or device count. Each
batch is sharded over every device (of every host); its chain runs in chunks
of one compiled program, so a progress bar can advance between them.
"""
import dataclasses
import math
import operator
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ddpm_jax import image_grid
from ddpm_jax import keys
from ddpm_jax import models
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import super_resolution as sr
from ddpm_jax.diffusion import GaussianDiffusion

# A chain is cut into about this many compiled chunks for the progress bar.
_CHUNKS_PER_CHAIN = 20


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How to run the reverse process.

  sampler: 'ancestral' or 'ddim'.
  steps: None for all T steps, else a respacing: an int K or a spacing string
    ('250', '10,10,20', 'ddim50'; see `sampling.space_timesteps`).
  eta: DDIM's noise scale (0 = deterministic).
  clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
  guidance_scale: classifier-free guidance w (class-conditional models
    trained with label dropout): eps = (1 + w) eps(x, y) - w eps(x, none).
  classifier_scale: classifier guidance s (needs a classifier in `generate`).
  resample: RePaint resampling per step when inpainting.
  """
  sampler: str = "ancestral"
  steps: Optional[int | str] = None
  eta: float = 0.0
  clip_denoised: bool = True
  guidance_scale: float = 0.0
  classifier_scale: float = 0.0
  resample: int = 1


def sampling_diffusion(config: ml_collections.ConfigDict,
                       options: SamplerOptions) -> GaussianDiffusion:
  """The (respaced) process to sample from; raises ValueError on bad options."""
  if models.is_classifier(config):
    raise ValueError("This run is a noise-aware classifier, not a diffusion "
                     "model: pass it as --classifier_workdir to guide a model.")
  if options.sampler not in sampling.SAMPLERS:
    raise ValueError(f"Unknown sampler {options.sampler!r}; choose one of "
                     f"{', '.join(sampling.SAMPLERS)}.")
  sampling.check_eta(options.eta)
  if options.eta and options.sampler != "ddim":
    raise ValueError(f"eta={options.eta} is DDIM's noise scale; the "
                     f"{options.sampler} sampler has none (it would be "
                     "ignored): use sampler='ddim', or eta=0.")
  if options.guidance_scale < 0 or options.classifier_scale < 0:
    raise ValueError("Guidance scales must be >= 0, got guidance_scale="
                     f"{options.guidance_scale}, classifier_scale="
                     f"{options.classifier_scale}.")
  if options.guidance_scale > 0 and int(config.model.num_classes) == 0:
    raise ValueError(
        "Classifier-free guidance needs a class-conditional model (trained "
        "with model.num_classes > 0 and training.label_dropout > 0); this "
        "model is unconditional.")
  if options.guidance_scale > 0 and not float(config.training.label_dropout):
    # Its "no class" prediction was never trained.
    raise ValueError(
        "Classifier-free guidance needs a model trained with label dropout "
        "(training.label_dropout > 0, e.g. configs/digits_cond.py); this one "
        "was trained with training.label_dropout=0, so its unconditional "
        "prediction is untrained. Sample it with --class_label alone.")
  if options.resample < 1:
    raise ValueError(f"resample must be >= 1, got {options.resample}.")
  d = models.create_diffusion(config)
  if options.steps is None or str(options.steps) == str(d.num_timesteps):
    return d
  return sampling.respace(d, options.steps)[0]


def batch_size_for(num_samples: int, batch_size: int,
                   num_devices: Optional[int] = None) -> int:
  """The batch `generate` compiles: `batch_size` capped at `num_samples`.

  Either is rounded up to a multiple of `num_devices` (default: every device
  of every host), so a small N runs no more chains than it needs.
  """
  n_dev = jax.device_count() if num_devices is None else num_devices
  return math.ceil(min(batch_size, num_samples) / n_dev) * n_dev


def example_keys(seed: int, start: int, count: int, stream: int = 0) -> np.ndarray:
  """Raw uint32 keys `[count, 2]` of examples start .. start + count - 1.

  `stream` > 0 gives independent keys for a later stage of the same samples
  (e.g. the super-resolution stage of a cascade). `seed` must lie in
  0..keys.MAX_SEED (see `keys.check_seed`).
  """
  keys.check_seed(seed)
  root = jax.random.PRNGKey(seed)
  if stream:
    root = jax.random.fold_in(root, 2**31 + stream)  # no example index is that large
  idx = jnp.arange(start, start + count, dtype=jnp.uint32)
  return np.asarray(jax.vmap(lambda i: jax.random.fold_in(root, i))(idx))


def random_labels(keys: np.ndarray, num_classes: int) -> np.ndarray:
  """One class per example, uniform, from the example's own key: int32 `[B]`."""
  # fold_in(key, 2**31) is a key the chain never uses (it folds in t <= T).
  label_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2**31))(jnp.asarray(keys))
  return np.asarray(jax.vmap(
      lambda k: jax.random.randint(k, (), 0, num_classes))(label_keys),
                    np.int32)


def make_chain_fn(model: Any, num_classes: int, options: SamplerOptions,
                  classifier: Any = None) -> Callable:
  """jitted `run(params, cls_params, d, x, keys, y, known, mask, low_res, t_start, t_end)`.

  Runs one chunk of a chain; `cls_params`, `y`, `known`, `mask` and
  `low_res` (a dict of the super-resolution inputs `low_res`, `aug_t`) may be
  None when unused.
  """

  def run(params, cls_params, d, x, keys, y, known, mask, low_res, t_start,
          t_end):
    # An unconditional model ignores labels (they may steer a classifier).
    cond = {} if low_res is None else low_res  # super-resolution inputs
    apply_fn = lambda x, t, y: model.apply({"params": params}, x, t,
                                           y if num_classes else None, **cond)
    if options.guidance_scale > 0:
      model_fn = sampling.classifier_free_guidance(
          apply_fn, y, num_classes, options.guidance_scale)
    else:
      model_fn = lambda x, t: apply_fn(x, t, y)
    cond_fn = None
    if classifier is not None:
      cond_fn = sampling.classifier_guidance(
          lambda x, t: classifier.apply({"params": cls_params}, x, t), y,
          options.classifier_scale)
    return sampling.sample_steps(
        d, model_fn, x, keys, t_start, t_end, sampler=options.sampler,
        eta=options.eta, clip_denoised=options.clip_denoised, cond_fn=cond_fn,
        known=known, known_mask=mask,
        resample=options.resample if known is not None else 1)

  return jax.jit(run)


def augment_low_res(d_train: GaussianDiffusion, low_res: np.ndarray, keys: np.ndarray,
                    aug_level: int) -> np.ndarray:
  """Noise-augments each low-resolution input with noise from its example's key."""
  noise = jax.vmap(lambda k, x: jax.random.normal(
      jax.random.fold_in(k, 2**31 + 1), x.shape))(jnp.asarray(keys), jnp.asarray(low_res))
  aug_t = jnp.full((low_res.shape[0],), aug_level, jnp.int32)
  return np.asarray(sr.augment(d_train, jnp.asarray(low_res), aug_t, noise))


def _check_classifier(config, classifier_config) -> int:
  """The number of classes both agree on; ValueError when they differ."""
  c = classifier_config
  if c.model.name != "classifier":
    raise ValueError(f"The classifier run has model.name={c.model.name!r}, "
                     "not 'classifier' (train one with configs/digits_classifier.py).")
  for key in ("image_size", "channels"):
    if c.data[key] != config.data[key]:
      raise ValueError(f"The classifier was trained on data.{key}="
                       f"{c.data[key]}, the model on {config.data[key]}.")
  if c.diffusion.num_timesteps != config.diffusion.num_timesteps:
    raise ValueError("The classifier was trained on T="
                     f"{c.diffusion.num_timesteps} noise levels, the model on "
                     f"T={config.diffusion.num_timesteps}.")
  # The classifier reads x_t at the model's noise levels: the same betas.
  if not np.allclose(models.create_diffusion(c).betas,
                     models.create_diffusion(config).betas, rtol=1e-6, atol=0):
    d_c, d_m = c.diffusion, config.diffusion
    raise ValueError(
        "The classifier was trained with other noise levels than the model "
        f"(betas {d_c.beta_schedule} {d_c.beta_start}..{d_c.beta_end} against "
        f"{d_m.beta_schedule} {d_m.beta_start}..{d_m.beta_end}): train it "
        "with the model's diffusion settings.")
  k = int(c.model.num_classes)
  if int(config.model.num_classes) not in (0, k):
    raise ValueError(f"The classifier has {k} classes, the model "
                     f"{config.model.num_classes}: they must be the same classes.")
  return k


def check_request(config: ml_collections.ConfigDict, *, num_samples: int,
                  batch_size: int, options: SamplerOptions = SamplerOptions(),
                  seed: int = 0, labels: Optional[np.ndarray] = None,
                  known: Optional[np.ndarray] = None,
                  known_mask: Optional[np.ndarray] = None,
                  classifier_config: Optional[ml_collections.ConfigDict] = None,
                  low_res: Optional[np.ndarray] = None,
                  aug_level: int = 0) -> GaussianDiffusion:
  """Every check `generate` makes of a request, without sampling.

  Takes `generate`'s arguments (`classifier_config`: the classifier run's
  config; only the shape of `low_res` is read, so a broadcast view of the
  right shape will do) and raises ValueError with what was wrong, so that a
  command can refuse a bad request before it starts work.

  Returns:
    The (respaced) process to sample from, as `sampling_diffusion`.
  """
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
    try:
      ok = operator.index(value) >= 1
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  keys.check_seed(seed)
  num_classes = int(config.model.num_classes)
  if classifier_config is not None:
    num_classes = _check_classifier(config, classifier_config)
  elif options.classifier_scale > 0:
    raise ValueError("classifier_scale > 0 needs a classifier run.")
  image_shape = (config.data.image_size, config.data.image_size,
                 config.data.channels)
  if (known is None) != (known_mask is None):
    raise ValueError("Inpainting needs both the known image and its mask.")
  if known is not None:
    if np.shape(known) != image_shape or np.shape(known_mask) not in (
        image_shape, image_shape[:2] + (1,)):
      raise ValueError(
          f"The inpainting image {np.shape(known)} and mask "
          f"{np.shape(known_mask)} must match the model's images {image_shape} "
          "(mask: [H, W, 1] or [H, W, C]).")
  elif options.resample > 1:
    raise ValueError("resample > 1 is for inpainting only.")
  low_res_size = int(config.model.get("low_res_size", 0))
  if (low_res is None) != (low_res_size == 0):
    raise ValueError(
        f"This model has model.low_res_size={low_res_size}: "
        + ("it is a super-resolution model and needs low-resolution inputs "
           "(--upsampler_workdir takes it as the second stage)." if low_res_size
           else "it takes no low-resolution inputs."))
  if low_res is not None:
    want = (num_samples, low_res_size, low_res_size, config.data.channels)
    if np.shape(low_res) != want:
      raise ValueError(f"The low-resolution inputs have shape "
                       f"{np.shape(low_res)}; this super-resolution model "
                       f"needs {want}.")
    if not 0 <= aug_level <= config.diffusion.num_timesteps:
      raise ValueError(f"aug_level must lie in 0..{config.diffusion.num_timesteps},"
                       f" got {aug_level}.")
  if labels is not None:
    labels = np.asarray(labels)
    if num_classes == 0:
      raise ValueError("Class labels were given but the model is unconditional "
                       "(model.num_classes = 0) and there is no classifier.")
    if labels.shape != (num_samples,):
      raise ValueError(f"labels must have shape [{num_samples}], got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"Class labels must be integers in 0..{num_classes - 1}, "
                       f"got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"Class labels must lie in 0..{num_classes - 1}, got "
                       f"{sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))}.")
  return sampling_diffusion(config, options)


def generate(config: ml_collections.ConfigDict, params: Any, *,
             num_samples: int, batch_size: int,
             options: SamplerOptions = SamplerOptions(), seed: int = 0,
             labels: Optional[np.ndarray] = None,
             known: Optional[np.ndarray] = None,
             known_mask: Optional[np.ndarray] = None,
             classifier: Optional[tuple[ml_collections.ConfigDict, Any]] = None,
             low_res: Optional[np.ndarray] = None, aug_level: int = 0,
             stream: int = 0, progress: bool = True) -> dict[str, Any]:
  """Draws `num_samples` images from the model of `config` with `params`.

  Args:
    config: the run's config (model, data and diffusion sections).
    params: the network's parameters (e.g. the EMA parameters).
    num_samples: N >= 1.
    batch_size: examples per compiled batch, over all devices; capped at N
      and rounded up to a multiple of the device count (`batch_size_for`).
    options: sampler, respacing, eta, clipping.
    seed: the root seed, 0..keys.MAX_SEED; example i uses
      `fold_in(PRNGKey(seed), i)`.
    labels: int `[N]` classes for a class-conditional (or classifier-guided)
      model; default: drawn uniformly per example from its key.
    known, known_mask: inpainting: float `[H, W, C]` in [-1, 1] and `[H, W, 1]`
      or `[H, W, C]` in {0, 1} (1 = keep the known pixel), shared by all N.
    classifier: (config, params) of a noise-aware classifier run, for
      classifier guidance with `options.classifier_scale`.
    low_res: a super-resolution model's inputs, float `[N, s, s, C]` in
      [-1, 1] (e.g. a first stage's samples): sample i upsamples low_res[i].
    aug_level: the noise-augmentation level applied to `low_res` (0: clean;
      the noise comes from each example's key).
    stream: see `example_keys`; 0 for a first (or only) stage.
    progress: show a progress bar over all steps of all batches.

  Returns:
    dict with `samples` uint8 `[N, H, W, C]` (clip, (x + 1) * 127.5, round),
    `labels` int32 `[N]` (the class of each sample: class-conditional
    models, and unconditional ones guided by a classifier), `seconds` and
    `batch_size` (the compiled batch, over all devices).

  Raises:
    ValueError: a bad request (see `check_request`), before any sampling.
  """
  d = check_request(
      config, num_samples=num_samples, batch_size=batch_size, options=options,
      seed=seed, labels=labels, known=known, known_mask=known_mask,
      classifier_config=None if classifier is None else classifier[0],
      low_res=low_res, aug_level=aug_level)
  num_classes = int(config.model.num_classes)
  classifier_model = cls_params = None
  if classifier is not None:
    num_classes = int(classifier[0].model.num_classes)  # see _check_classifier
    classifier_model = models.create_model(classifier[0])
    cls_params = classifier[1]
  image_shape = (config.data.image_size, config.data.image_size,
                 config.data.channels)
  if known is not None:
    known = np.asarray(known, np.float32)
    known_mask = np.asarray(known_mask, np.float32)
  if low_res is not None:
    low_res = np.asarray(low_res, np.float32)
  if labels is not None:
    labels = np.asarray(labels, np.int32)
  model = models.create_model(config)
  mesh = parallel.create_mesh()
  batch_size = batch_size_for(num_samples, batch_size, mesh.devices.size)
  shard = parallel.batch_sharding(mesh)
  run = make_chain_fn(model, int(config.model.num_classes), options,
                      classifier_model)
  prior = jax.jit(lambda d, keys: sampling.prior_sample(
      d, keys, (keys.shape[0],) + image_shape), out_shardings=shard)
  params = jax.device_put(params, parallel.replicated(mesh))
  if cls_params is not None:
    cls_params = jax.device_put(cls_params, parallel.replicated(mesh))

  def to_global(a):
    return jax.make_array_from_callback(a.shape, shard, lambda idx: a[idx])

  batch_known = batch_mask = None
  if known is not None:  # the same image and mask for every sample
    batch_known = to_global(np.broadcast_to(known, (batch_size,) + image_shape))
    batch_mask = to_global(np.broadcast_to(
        known_mask, (batch_size,) + known_mask.shape))
  num_batches = math.ceil(num_samples / batch_size)
  steps = d.num_timesteps
  chunk = max(1, math.ceil(steps / _CHUNKS_PER_CHAIN))
  bar = tqdm(total=num_batches * steps, unit="step", disable=not progress
             or jax.process_index() != 0, desc="sampling")
  out_images, out_labels = [], []
  start_time = time.perf_counter()
  for b in range(num_batches):
    keys = example_keys(seed, b * batch_size, batch_size, stream)
    if num_classes:
      y = (random_labels(keys, num_classes) if labels is None else np.resize(
          labels[b * batch_size:(b + 1) * batch_size], batch_size))
      out_labels.append(y)
      y = to_global(y)
    else:
      y = None
    batch_low_res = None
    if low_res is not None:
      lr = np.resize(low_res[b * batch_size:(b + 1) * batch_size],
                     (batch_size,) + low_res.shape[1:])
      if aug_level:
        lr = augment_low_res(models.create_diffusion(config), lr, keys, aug_level)
      batch_low_res = {"low_res": to_global(lr), "aug_t": to_global(
          np.full((batch_size,), aug_level, np.int32))}
    keys = to_global(keys)
    x = prior(d, keys)
    for hi in range(steps, 0, -chunk):
      lo = max(hi - chunk, 0)
      x = run(params, cls_params, d, x, keys, y, batch_known, batch_mask,
              batch_low_res, hi, lo)
      x.block_until_ready()
      bar.update(hi - lo)
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out_images.append(image_grid.to_uint8(np.asarray(x)))
  bar.close()
  seconds = time.perf_counter() - start_time
  result = dict(samples=np.concatenate(out_images)[:num_samples],
                seconds=seconds, batch_size=batch_size)
  if num_classes:
    result["labels"] = np.concatenate(out_labels)[:num_samples]
  return result
