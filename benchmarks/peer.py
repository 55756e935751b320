"""The PyTorch peer: diffusers' `UNet2DModel`, a train step and sampler loops.

The network mirrors our config (for `configs/cifar10.py` exactly the
`google/ddpm-cifar10-32` configuration, checked by `diffusers_unet_config`),
float32, NCHW (PyTorch's native layout), on the first CUDA GPU when torch
sees one (as JAX uses its GPU), else on the CPU, where torch uses every core
(as JAX on CPU does by default) unless told otherwise.
"""
import os
from typing import Any, Callable, Optional

import ml_collections
import numpy as np

# google/ddpm-cifar10-32's config.json (the model part), written out by hand.
GOOGLE_DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6,
    norm_num_groups=32,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    attention_head_dim=None,
    act_fn="silu",
    time_embedding_type="positional",
    mid_block_scale_factor=1,
    center_input_sample=False,
)


def diffusers_unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The diffusers `UNet2DModel` kwargs of the network our config describes.

  For the DDPM CIFAR-10 network this is `GOOGLE_DDPM_CIFAR10_32` (checked);
  other configs (e.g. the tiny digits test model) map level by level.
  Dropout is `config.model.dropout` (active in `model.train()` only).
  """
  m = config.model
  if m.num_classes or config.diffusion.model_var_type in ("learned", "learned_range"):
    raise ValueError("The diffusers peer covers unconditional fixed-variance models only "
                     f"(model.num_classes={m.num_classes}, "
                     f"diffusion.model_var_type={config.diffusion.model_var_type!r}).")
  if not m.resamp_with_conv:
    raise ValueError("The diffusers peer needs model.resamp_with_conv=True.")
  size = int(config.data.image_size)
  down, up = [], []
  for level in range(len(m.ch_mult)):
    res = size // 2**level
    down.append("AttnDownBlock2D" if res in m.attn_resolutions else "DownBlock2D")
    up.insert(0, "AttnUpBlock2D" if res in m.attn_resolutions else "UpBlock2D")
  cfg = dict(GOOGLE_DDPM_CIFAR10_32)
  cfg.update(
      sample_size=size,
      in_channels=int(config.data.channels),
      out_channels=int(config.data.channels),
      block_out_channels=tuple(int(m.ch) * int(c) for c in m.ch_mult),
      layers_per_block=int(m.num_res_blocks),
      down_block_types=tuple(down),
      up_block_types=tuple(up),
  )
  # Our middle block always has attention, as diffusers' does (add_attention).
  is_cifar = (size == 32 and tuple(m.ch_mult) == (1, 2, 2, 2) and m.ch == 128
              and m.num_res_blocks == 2 and tuple(m.attn_resolutions) == (16,)
              and config.data.channels == 3)
  if is_cifar and cfg != GOOGLE_DDPM_CIFAR10_32:
    raise AssertionError(f"CIFAR-10 mapping drifted from google/ddpm-cifar10-32: {cfg}")
  cfg["dropout"] = float(m.dropout)
  return cfg


def check_config(config: ml_collections.ConfigDict,
                 threads: Optional[int] = None) -> None:
  """Raises ValueError unless the peer can mirror `config` (network and schedule).

  Cheap (no torch): run before compiling anything, so a run that cannot
  compare fails in seconds.
  """
  diffusers_unet_config(config)
  _check_schedule(config)
  if threads is not None and threads < 1:
    raise ValueError(f"--torch_threads must be >= 1 (or unset for all cores), got {threads}.")


def setup_torch(threads: Optional[int] = None):
  """Imports torch; with `threads`, sets its intra-op thread count. Returns torch."""
  import torch  # pylint: disable=g-import-not-at-top
  if threads is not None:
    if threads < 1:
      raise ValueError(f"torch threads must be >= 1, got {threads}.")
    torch.set_num_threads(threads)
  return torch


def device():
  """The torch device the peer runs on: 'cuda' when torch sees a GPU, else 'cpu'.

  On a GPU, float32 matrix products and convolutions may use TF32, as JAX's
  default precision does there (torch's default allows it for convolutions
  only).
  """
  torch = setup_torch()
  if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")
  return torch.device("cpu")


def synchronize() -> None:
  """Waits for queued GPU work (torch launches CUDA kernels asynchronously)."""
  torch = setup_torch()
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def create_unet(config: ml_collections.ConfigDict, seed: int = 0,
                threads: Optional[int] = None):
  """A randomly initialised float32 diffusers `UNet2DModel` for `config` on `device()`.

  Sets torch's thread count to `threads` (default: every core, as JAX on CPU
  uses every core by default). The weights are drawn on the CPU, so they are
  the same on either device.
  """
  torch = setup_torch(threads or os.cpu_count())
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return UNet2DModel(**diffusers_unet_config(config)).float().to(device())


def num_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


def _alphas_cumprod(config):
  from ddpm_jax import schedules  # pylint: disable=g-import-not-at-top
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, d.num_timesteps,
                                      beta_start=d.beta_start, beta_end=d.beta_end)
  return np.cumprod(1.0 - betas), betas


def make_train_step(config: ml_collections.ConfigDict, model, batch_size: int,
                    seed: int = 0) -> Callable[[], float]:
  """`step() -> loss`: the PyTorch equivalent of our full train step.

  Noise and t drawn on the fly, q_sample, forward (dropout on), MSE, backward,
  global-norm clipping, Adam (same hyper-parameters) and an EMA update of
  every parameter, on one fixed batch of images in [-1, 1].
  """
  torch = setup_torch()
  dev = device()
  o = config.optim
  gen = torch.Generator(dev).manual_seed(seed)
  size, channels = int(config.data.image_size), int(config.data.channels)
  x0 = torch.rand(batch_size, channels, size, size, generator=gen, device=dev) * 2 - 1
  abar, _ = _alphas_cumprod(config)
  abar = torch.tensor(abar, dtype=torch.float32, device=dev)
  num_t = int(config.diffusion.num_timesteps)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=float(o.lr), betas=(float(o.beta1), float(o.beta2)),
                         eps=float(o.eps))
  decay = float(o.ema_decay)

  def step() -> float:
    # The same module also samples (eval mode): dropout must be on here.
    model.train()
    t = torch.randint(0, num_t, (batch_size,), generator=gen, device=dev)
    noise = torch.randn(x0.shape, generator=gen, device=dev)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = model(x_t, t).sample
    loss = torch.nn.functional.mse_loss(out, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip and o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, float(o.grad_clip))
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)  # pylint: disable=protected-access
    return float(loss.detach())  # waits for the step

  return step


def _check_schedule(config) -> None:
  if config.diffusion.beta_schedule != "linear":
    raise ValueError("The diffusers peer is set up for linear betas, got "
                     f"{config.diffusion.beta_schedule!r}.")


def _scheduler(config, kind: str):
  from diffusers import DDIMScheduler, DDPMScheduler  # pylint: disable=g-import-not-at-top
  d = config.diffusion
  common = dict(num_train_timesteps=int(d.num_timesteps), beta_start=float(d.beta_start),
                beta_end=float(d.beta_end), beta_schedule=d.beta_schedule, clip_sample=True)
  _check_schedule(config)
  if kind == "ancestral":
    return DDPMScheduler(variance_type="fixed_large", **common)
  return DDIMScheduler(set_alpha_to_one=False, **common)


def make_sampler(config: ml_collections.ConfigDict, model, batch_size: int, *,
                 sampler: str = "ancestral", num_inference_steps=None,
                 seed: int = 0):
  """The loop of diffusers' `DDPMPipeline` / `DDIMPipeline`, step by step.

  Returns `(timesteps, init, run)`: the scheduler's timesteps (T for
  ancestral sampling, `num_inference_steps` for DDIM), `init() -> x_T`
  (NCHW noise), and `run(x, timesteps) -> x`, which applies the pipeline's
  `model(x, t).sample` then `scheduler.step(...)` for each given timestep
  under `torch.inference_mode()`, so a caller can time part of a chain; it
  returns once the GPU (if any) has finished.
  """
  torch = setup_torch()
  dev = device()
  scheduler = _scheduler(config, sampler)
  scheduler.set_timesteps(num_inference_steps or int(config.diffusion.num_timesteps))
  gen = torch.Generator(dev).manual_seed(seed)
  model.eval()
  size, channels = int(config.data.image_size), int(config.data.channels)

  def init():
    return torch.randn(batch_size, channels, size, size, generator=gen, device=dev)

  def run(x, timesteps):
    model.eval()
    with torch.inference_mode():
      for t in timesteps:
        eps = model(x, t).sample
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    synchronize()
    return x

  return list(scheduler.timesteps), init, run


def make_forward(model, x) -> Callable[[], Any]:
  """`fwd()`: one inference forward pass on the fixed batch `x` (NCHW), finished."""
  torch = setup_torch()
  model.eval()
  t = torch.full((x.shape[0],), 500, dtype=torch.long, device=x.device)

  def fwd():
    model.eval()
    with torch.inference_mode():
      out = model(x, t).sample
    synchronize()
    return out

  return fwd
