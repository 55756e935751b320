"""The DDPM train step: one pure function `train_step(state, batch)`.

`make_train_step` closes over the config, the Flax module and the diffusion
constants and returns `train_step(state, batch) -> (state, metrics)`;
`jit_train_step` compiles it over a device mesh with the state donated.

Three objectives share the step: the diffusion loss (the default), the same
for a super-resolution U-Net (`model.low_res_size > 0`: conditioned on the
area-downsampled, noise-augmented batch, see `super_resolution`), and softmax
cross-entropy of a noise-aware classifier (`model.name == 'classifier'`) on
x_t = q_sample(x_0, t, noise) with t ~ U{0..T-1}.
"""
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ddpm_jax import parallel
from ddpm_jax import train_state as ts

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]

NUM_QUARTILES = 4


def make_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    diffusion: Any,
    losses_fn: Optional[Callable[..., Dict[str, jax.Array]]] = None,
) -> Callable[[ts.TrainState, Batch], tuple[ts.TrainState, Metrics]]:
  """Builds the pure train step.

  Args:
    config: the run config (optim.*, training.{label_dropout,steps_per_call},
      model.num_classes).
    model: Flax module, `model.apply({'params': p}, x, t, y, train=True,
      rngs={'dropout': k})`.
    diffusion: a `GaussianDiffusion`; `diffusion.num_timesteps` is static.
    losses_fn: `(diffusion, model_fn, x_start, t, noise) -> {'loss': [B]}`;
      defaults to `ddpm_jax.diffusion.training_losses`.

  Returns:
    `train_step(state, batch) -> (state, metrics)`. `batch['image']` is
    float32 [B, H, W, C] in [-1, 1] and `batch['label']` int32 [B] (used only
    when model.num_classes > 0). With `training.steps_per_call` K > 1 every
    batch leaf is stacked [K, B, ...], the K steps run under `lax.scan`
    (unrolled on a CPU) and every metric is [K]. Metrics per step: 'loss'
    (mean over the batch), 'grad_norm' (before clipping), 'param_norm', 'lr'
    (of this update),
    'loss_q{i}_sum' / 'loss_q{i}_count' for the quartiles i of t (sums so
    the host can average over a logging window without empty-quartile NaNs),
    and for classifiers 'accuracy' (fraction of the batch classified right).
  """
  from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import super_resolution as sr  # pylint: disable=g-import-not-at-top
  if losses_fn is None:
    losses_fn = diffusion_lib.training_losses
  is_classifier = config.model.name == "classifier"
  low_res_size = int(config.model.get("low_res_size", 0))
  max_aug_level = (sr.max_aug_level(int(diffusion.num_timesteps),
                                    float(config.model.get("noise_aug_max", 0.0)))
                   if low_res_size else 0)
  tx = ts.create_optimizer(config)
  lr_fn = ts.create_learning_rate_fn(config)
  num_timesteps = int(diffusion.num_timesteps)
  num_classes = int(config.model.num_classes)
  label_dropout = float(config.training.label_dropout)
  steps_per_call = int(config.training.steps_per_call)
  if not 0.0 <= label_dropout < 1.0:
    raise ValueError(f"training.label_dropout must be in [0, 1), got {label_dropout}.")
  if steps_per_call < 1:
    raise ValueError(f"training.steps_per_call must be >= 1, got {steps_per_call}.")

  def one_step(state: ts.TrainState, batch: Batch):
    x0 = batch["image"]  # [B, H, W, C]
    batch_size = x0.shape[0]
    # A fresh key per update; it depends only on (run key, step), so resumed
    # and sharded runs draw the same numbers.
    key = jax.random.fold_in(state.rng, state.step)
    k_t, k_noise, k_dropout, k_label = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    y = None
    if num_classes > 0 and not is_classifier:
      y = batch["label"].astype(jnp.int32)
      if label_dropout > 0:
        # The id num_classes means "no class" (classifier-free guidance).
        drop = jax.random.bernoulli(k_label, label_dropout, (batch_size,))
        y = jnp.where(drop, num_classes, y)

    cond = {}
    if low_res_size:
      # A key of its own (fold_in), so the other draws match non-SR runs.
      low_res, aug_t = sr.training_condition(
          diffusion, x0, low_res_size, max_aug_level, jax.random.fold_in(key, 1))
      cond = {"low_res": low_res, "aug_t": aug_t}

    def diffusion_loss_fn(params):
      def model_fn(x, tt):
        return model.apply({"params": params}, x, tt, y, train=True,
                           rngs={"dropout": k_dropout}, **cond)
      losses = losses_fn(diffusion, model_fn, x0, t, noise)["loss"]  # [B]
      return jnp.mean(losses), (losses, {})

    def classifier_loss_fn(params):
      labels = batch["label"].astype(jnp.int32)  # [B]
      x_t = diffusion_lib.q_sample(diffusion, x0, t, noise)
      logits = model.apply({"params": params}, x_t, t, train=True,
                           rngs={"dropout": k_dropout})  # [B, K]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
      return jnp.mean(losses), (losses, {"accuracy": jnp.mean(correct)})

    loss_fn = classifier_loss_fn if is_classifier else diffusion_loss_fn
    (loss, (losses, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = ts.ema_update(state.ema_params, params, ts.ema_decay(config, state.step))
    metrics = {
        "loss": loss,
        "grad_norm": ts.global_norm(grads),
        "param_norm": ts.global_norm(params),
        "lr": jnp.asarray(lr_fn(state.step), jnp.float32),
        **extra,
    }
    quartile = (t * NUM_QUARTILES) // num_timesteps  # [B] in 0..3
    for i in range(NUM_QUARTILES):
      in_q = (quartile == i).astype(jnp.float32)
      metrics[f"loss_q{i}_sum"] = jnp.sum(losses * in_q)
      metrics[f"loss_q{i}_count"] = jnp.sum(in_q)
    new_state = state.replace(step=state.step + 1, params=params,
                              ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  def train_step(state: ts.TrainState, batch: Batch):
    if steps_per_call == 1:
      return one_step(state, batch)
    # XLA's CPU backend leaves a convolution's weight gradient inside a loop
    # body in a layout that only its naive convolution runs (~30x slower,
    # jax 0.10), so on a CPU the K steps are unrolled (K copies to compile).
    unroll = jax.default_backend() == "cpu"
    return jax.lax.scan(one_step, state, batch, unroll=True if unroll else 1)

  return train_step


def jit_train_step(train_step, mesh: Mesh, state_sharding: Any, steps_per_call: int = 1):
  """Compiles `train_step` over `mesh`: batch on 'data', state donated."""
  batch_sharding = parallel.batch_sharding(mesh, leading_axes=1 if steps_per_call > 1 else 0)
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, parallel.replicated(mesh)),
      donate_argnums=0,
  )
