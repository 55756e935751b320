"""Test-set bits/dim: the full variational bound over a data split.

Runs `diffusion.calc_bpd_loop` on every example of the split exactly once
(sharded over every device of every host, padding masked out) and reports the
terms of the DDPM paper's Table 2: the prior L_T, the decoder L_0 and the sum
of L_1 .. L_{T-1}, plus the mean of each L_t.
"""
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import keys
from ddpm_jax import models
from ddpm_jax import parallel


def make_bpd_fn(model: Any, conditional: bool):
  """jitted `(params, d, batch, root_key) -> masked sums` of one global batch."""

  def bpd_sums(params, d, batch, root):
    y = batch["label"] if conditional else None
    model_fn = lambda x, t: model.apply({"params": params}, x, t, y)
    # Example i's noise comes from fold_in(root, i): the result does not
    # depend on the batch size or the device count.
    rng = jax.vmap(lambda i: jax.random.fold_in(root, i))(
        jnp.maximum(batch["index"], 0))
    out = diffusion.calc_bpd_loop(d, model_fn, batch["image"], rng)
    mask = batch["mask"].astype(jnp.float32)  # [B]
    masked = lambda v: jnp.sum(v * mask)
    return dict(
        count=jnp.sum(mask),
        total_bpd=masked(out["total_bpd"]),
        prior_bpd=masked(out["prior_bpd"]),
        decoder_bpd=masked(out["vb"][:, 0]),
        vb_sum_bpd=masked(jnp.sum(out["vb"][:, 1:], axis=1)),
        vb_per_t=jnp.sum(out["vb"] * mask[:, None], axis=0),  # [T]
    )

  return jax.jit(bpd_sums)


def check_inputs(config: ml_collections.ConfigDict, *, split: str = "test",
                 num_examples: Optional[int] = None) -> int:
  """The number of examples `evaluate_bpd` would evaluate; checks, computes nothing.

  Raises:
    ValueError: a classifier run (no likelihood), a super-resolution run
      (its bound is conditional on a low-resolution image), a bad data
      config or split, or num_examples outside [1, len(split)].
  """
  return _checked_inputs(config, split, num_examples)[1]


def _checked_inputs(config: ml_collections.ConfigDict, split: str,
                    num_examples: Optional[int]) -> tuple[str, int]:
  """(the split read, the number of examples) after `check_inputs`' checks.

  The split read is the data set's own name for it: tfds reads 'test' of a
  data set without one (LSUN) from 'validation'.
  """
  if models.is_classifier(config):
    raise ValueError("This run is a noise-aware classifier: it has no "
                     "likelihood to evaluate.")
  if int(config.model.get("low_res_size", 0)):
    raise ValueError(
        "This run is a super-resolution model (model.low_res_size="
        f"{config.model.low_res_size}): its likelihood is conditional on a "
        "low-resolution image, which bits/dim does not evaluate; evaluate "
        "the base model of the cascade instead.")
  source = input_pipeline.create_source(config, split)
  split_read, total = getattr(source, "split", split), len(source)
  if num_examples is None:
    return split_read, total
  if not isinstance(num_examples, int) or not 1 <= num_examples <= total:
    raise ValueError(f"num_examples must be an int in [1, {total}] (the size "
                     f"of split {split!r}); got {num_examples!r}.")
  return split_read, num_examples


def evaluate_bpd(config: ml_collections.ConfigDict, params: Any, *,
                 split: str = "test", batch_size: int = 64,
                 num_examples: Optional[int] = None, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
  """The variational bound of a data split in bits per dimension.

  Args:
    config: the run's config.
    params: network parameters (usually the EMA parameters).
    split: the data split ('test' by default).
    batch_size: global batch size; rounded up to a multiple of the device
      count (padding is masked out), and capped at the examples rounded up
      likewise.
    num_examples: the first n examples of the split (default: all of it).
    seed: 0..keys.MAX_SEED; example i of the split draws its noise from
      `fold_in(PRNGKey(seed), i)`, whatever the batch size or device count.
    progress: show a progress bar over batches.

  Returns:
    dict of Python floats: `total_bpd` (mean over examples of
    L_T + L_0 + sum L_1..L_{T-1}), `prior_bpd` (L_T), `decoder_bpd` (L_0),
    `vb_sum_bpd` (sum of L_1..L_{T-1}), `vb_per_t` (list of T means),
    `num_examples`, `seconds`; `conditional` (True when a class-conditional
    model was given each example's label) and `split`, the split read
    ('validation' for 'test' of a data set without a test split).
  """
  keys.check_seed(seed)
  split_read, total = _checked_inputs(config, split, num_examples)
  mesh = parallel.create_mesh()
  n_dev = mesh.devices.size
  # A multiple of the device count, and no wider than the examples need: each
  # padding row would cost a whole chain of T network evaluations.
  batch_size = min(math.ceil(batch_size / n_dev),
                   math.ceil(total / n_dev)) * n_dev
  model = models.create_model(config)
  d = models.create_diffusion(config)
  conditional = int(config.model.num_classes) > 0
  it = input_pipeline.create_eval_iterator(
      config, split=split, batch_size=batch_size, num_examples=num_examples)
  bpd_fn = make_bpd_fn(model, conditional)
  params = jax.device_put(params, parallel.replicated(mesh))
  sharding = parallel.batch_sharding(mesh)
  root = jax.random.PRNGKey(seed)
  sums = None
  start = time.perf_counter()
  num_batches = math.ceil(math.ceil(total / jax.process_count()) /
                          (batch_size // jax.process_count()))
  bar = tqdm(it, total=num_batches, unit="batch", desc="bits/dim",
             disable=not progress or jax.process_index() != 0)
  for local in bar:
    batch = parallel.global_batch(local, sharding, batch_size)
    out = bpd_fn(params, d, batch, root)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if progress:
      seen = float(sums["count"])
      bar.set_postfix(bpd=f"{float(sums['total_bpd']) / max(seen, 1):.4f}")
  bar.close()
  sums = jax.tree.map(lambda v: np.asarray(v, np.float64), sums)
  n = float(sums["count"])
  if int(n) != total:
    raise RuntimeError(f"Evaluated {int(n)} examples, expected {total}.")
  result = {k: float(sums[k] / n) for k in
            ("total_bpd", "prior_bpd", "decoder_bpd", "vb_sum_bpd")}
  result.update(vb_per_t=(sums["vb_per_t"] / n).tolist(), num_examples=int(n),
                seconds=time.perf_counter() - start, conditional=conditional,
                split=split_read)
  return result
