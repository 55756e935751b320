r"""Training and sampling throughput of ddpm_jax, optionally against diffusers.

  python -m benchmarks.throughput --config configs/cifar10.py --batch_size 8 \
      --compare diffusers [--repeats 5] [--json out.json]

Measures on device 0, for one batch size:
- train: the full jitted train step of `ddpm_jax.train_step` (t and noise
  drawn, forward, backward, clipping, Adam, EMA), images/s;
- sample: a compiled chunk of ancestral steps through the production
  sampler (`sampling.sample_steps` in a `lax` loop), network evaluations/s (one ancestral
  step of the batch = one evaluation per image);
- forward: one inference forward pass, and its GFLOP/s (FLOPs from XLA's cost
  analysis of the network with direct convolutions, whatever
  `model.conv_algorithm` runs) against a measured large-matmul GFLOP/s of the
  same device;
- compile times, XLA's memory estimate of each program, peak memory.

With `--compare diffusers` the same measurements run on diffusers'
`UNet2DModel` (same architecture and parameter count, float32; PyTorch on
the GPU if it sees one, else with every core) with an equivalent PyTorch
train step and the `DDPMScheduler` loop, interleaved with ours repeat by
repeat (ours, theirs, ours, ...), so load from other processes hits both
sides; ratios are ours/theirs per repeat, reported as median (min, max).
The peer runs in a process of its own (`peer_process`), as each library
runs for its users. Warm-up runs are excluded from every timing, and each timed
call follows an untimed one of the same side.
"""
import argparse
import copy
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from benchmarks import peer_process
from ddpm_jax import cpu_memory

COMPARE = ("none", "diffusers")
PARTS = ("train", "sample", "forward")


def make_chain_fn(model, sampler: str = "ancestral"):
  """jitted `run(params, d, x, keys, t_start, t_end) -> x`: one chunk of a chain.

  The sampler of `ddpm_jax.sample` (`sampling.sample_steps`, a `lax` loop
  with traced bounds, clipping x0, per-example keys), so one compiled
  program serves every chunk, as in production.
  """
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top

  def run(params, d, x, keys, t_start, t_end):
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    return sampling.sample_steps(d, model_fn, x, keys, t_start, t_end, sampler=sampler,
                                 clip_denoised=True)

  return jax.jit(run)


def example_keys(seed: int, batch_size: int) -> jax.Array:
  """Raw keys `[B, 2]`, one per example: `fold_in(PRNGKey(seed), i)`."""
  root = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(batch_size))


def _num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Ours:
  """Compiled train step, sampling chunk and forward pass of ddpm_jax (those in `parts`)."""

  def __init__(self, config, batch_size: int, sample_steps: int, seed: int = 0,
               parts: tuple[str, ...] = PARTS):
    from ddpm_jax import models  # pylint: disable=g-import-not-at-top
    from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
    from ddpm_jax import train_state as ts  # pylint: disable=g-import-not-at-top
    from ddpm_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
    parallel.configure_jax()
    self.batch_size, self.sample_steps = batch_size, sample_steps
    self.compile_s, self.program_bytes = {}, {}
    self.train_flops = self.forward_flops = None
    model = models.create_model(config)
    self.diffusion = models.create_diffusion(config)
    # FLOPs are counted for the direct algorithm (XLA's cost analysis of the
    # same programs with model.conv_algorithm='direct', lowered for the CPU,
    # not compiled): the network's work, comparable across algorithms,
    # platforms and with the peer's. A Winograd program executes fewer
    # multiplications. The CPU because JAX 0.11 has no cost analysis of
    # lowered GPU programs, and a compiled GPU program's count leaves out
    # its cuDNN convolutions (2.2 instead of 35 GFLOP per CIFAR-10 image).
    direct_config = copy.deepcopy(config)
    direct_config.model.conv_algorithm = "direct"
    direct_config.training.steps_per_call = 1  # FLOPs per step
    # Model FLOPs (MFU's convention): rematerialisation's recomputation is
    # work the chip does, not work the model needs (+17% for the 256x256 one).
    direct_config.model.remat = False
    self.steps_per_call = int(config.training.steps_per_call)
    direct_model = models.create_model(direct_config)
    cpu_mesh = parallel.create_mesh(jax.devices("cpu")[:1])
    on_cpu = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=parallel.replicated(cpu_mesh)), tree)
    # One device: the benchmark measures one chip.
    mesh = parallel.create_mesh(jax.devices()[:1])
    # Jitted: an eager Flax init dispatches op by op, slower than compiling it.
    with jax.default_device(jax.devices()[0]):
      state = jax.jit(lambda key: ts.create_train_state(config, key, model))(
          jax.random.PRNGKey(seed))
    self.num_params = _num_params(state.params)
    # A separate buffer: the train step donates (and overwrites) the state.
    self.params = jax.tree.map(jnp.copy, state.params)
    size, channels = int(config.data.image_size), int(config.data.channels)
    num_t = self.diffusion.num_timesteps
    if not 1 <= sample_steps <= num_t:
      raise ValueError(f"--sample_steps must be in 1..{num_t}, got {sample_steps}.")
    self.x_t = jax.random.normal(jax.random.PRNGKey(seed + 1),
                                 (batch_size, size, size, channels))

    if "train" in parts:
      shardings = parallel.state_shardings(state, mesh)
      rng = np.random.default_rng(seed)
      batch = {"image": rng.uniform(-1, 1, (batch_size, size, size, channels)).astype(
          np.float32), "label": np.zeros((batch_size,), np.int32)}
      k = self.steps_per_call
      # With K steps per call the batch is stacked [K, B, ...] (the same K times).
      self.batch = jax.device_put(
          batch if k == 1 else jax.tree.map(lambda a: np.stack([a] * k), batch),
          parallel.batch_sharding(mesh, leading_axes=int(k > 1)))
      jit_step = lambda c, m, mesh, shardings: train_step_lib.jit_train_step(
          train_step_lib.make_train_step(c, m, self.diffusion), mesh, shardings,
          int(c.training.steps_per_call))
      self._train = self._compile("train", jit_step(config, model, mesh, shardings), state,
                                  self.batch)
      self.train_flops = measure.cost_flops(
          jit_step(direct_config, direct_model, cpu_mesh,
                   parallel.state_shardings(state, cpu_mesh)).lower(
                       on_cpu(state), on_cpu(batch)))
      self.state = state
    else:
      del state  # frees the optimiser state before the other parts compile

    if "sample" in parts:
      keys = example_keys(seed, batch_size)
      self._chain_args = (self.params, self.diffusion, self.x_t, keys, num_t,
                          num_t - sample_steps)
      self._chain = self._compile("sample_chunk", make_chain_fn(model), *self._chain_args)

    # The forward program is always lowered: its FLOPs give sampling's GFLOP/s.
    self._fwd_args = (self.params, self.x_t, jnp.full((batch_size,), num_t // 2, jnp.int32))
    fwd_of = lambda m: jax.jit(lambda p, x, t: m.apply({"params": p}, x, t))
    if "forward" in parts:
      self._fwd = self._compile("forward", fwd_of(model), *self._fwd_args)
    self.forward_flops = measure.cost_flops(
        fwd_of(direct_model).lower(*on_cpu(self._fwd_args)))
    # Warm-up (excluded from timings): first calls allocate and page in;
    # the train step's memory settles over its first steps (2, as the peer's).
    for part in parts:
      getattr(self, part)(*([2] if part == "train" else []))

  def _compile(self, name: str, jitted, *args):
    """Compiles `jitted` for `args`, recording its compile time and memory estimate."""
    holder = {}
    self.compile_s[name] = measure.timed(
        lambda: holder.setdefault("c", jitted.lower(*args).compile()))
    self.program_bytes[name] = measure.program_memory_bytes(holder["c"])
    return holder["c"]

  def train(self, iters: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `iters` train steps (dispatched back to back, then blocked).

    With `training.steps_per_call` K, `iters // K` calls (at least one).
    """
    def run():
      metrics = None
      for _ in range(max(1, iters // self.steps_per_call)):
        self.state, metrics = self._train(self.state, self.batch)
      loss = float(jnp.ravel(metrics["loss"])[-1])
      if not np.isfinite(loss):
        raise FloatingPointError(f"train step loss is {loss}")
    return measure.timed_wall_cpu(run)

  def sample(self) -> tuple[float, float]:
    return measure.timed_wall_cpu(lambda: self._chain(*self._chain_args).block_until_ready())

  def forward(self) -> tuple[float, float]:
    return measure.timed_wall_cpu(lambda: self._fwd(*self._fwd_args).block_until_ready())


class Theirs:
  """diffusers' UNet2DModel: PyTorch train step, DDPMScheduler loop, forward (`parts`)."""

  def __init__(self, config, batch_size: int, sample_steps: int, seed: int = 0,
               threads: Optional[int] = None, parts: tuple[str, ...] = PARTS):
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    self.unet = peer.create_unet(config, seed, threads)
    self.threads = peer.setup_torch().get_num_threads()
    self.device = str(peer.device())
    self.num_params = peer.num_params(self.unet)
    self.sample_steps = sample_steps
    if "train" in parts:
      self._train = peer.make_train_step(config, self.unet, batch_size, seed)
    timesteps, init, self._run = peer.make_sampler(config, self.unet, batch_size, seed=seed)
    self._timesteps = timesteps[:sample_steps]
    self._x = init()
    self._fwd = peer.make_forward(self.unet, self._x)
    # Warm-up, excluded from timings: torch's first steps allocate the Adam
    # state and caches and run several times slower than later ones.
    for part in parts:
      getattr(self, part)(*([2] if part == "train" else []))

  def train(self, iters: int) -> tuple[float, float]:
    def run():
      for _ in range(iters):
        loss = self._train()
      if not np.isfinite(loss):
        raise FloatingPointError(f"peer train step loss is {loss}")
    return measure.timed_wall_cpu(run)

  def sample(self) -> tuple[float, float]:
    return measure.timed_wall_cpu(lambda: self._run(self._x, self._timesteps))

  def forward(self) -> tuple[float, float]:
    return measure.timed_wall_cpu(self._fwd)

  def describe(self) -> dict[str, Any]:
    return dict(num_params=self.num_params, torch_threads=self.threads, device=self.device,
                peak_memory=measure.peak_memory())


def run_benchmark(config, *, batch_size: int, repeats: int = 5, train_iters: int = 2,
                  sample_steps: int = 4, steps_per_call: int = 1, compare: str = "none",
                  torch_threads: Optional[int] = None, seed: int = 0,
                  matmul_size: Optional[int] = None, peak_tflops: Optional[float] = None,
                  parts: tuple[str, ...] = PARTS, profile_dir: Optional[str] = None,
                  log=print) -> dict[str, Any]:
  """Runs the interleaved measurements; returns every number (see module doc).

  Returns:
    dict with `machine`, `config` (a summary), `matmul_gflops`, `ours` and
    (with compare) `theirs` and `ratio`; every timing entry is a summary
    dict(min, median, max, n) over the repeats. `matmul_size` overrides the
    size of the peak-matmul probe (see `measure.matmul_peak_gflops`);
    `peak_tflops`, the chip's nominal peak for the dtype (e.g. 989 for an
    H100 SXM in bfloat16), adds the train step's model FLOP utilisation.
    `parts` (a subset of `PARTS`) limits what is compiled and timed, e.g.
    ('train',) for the training memory of a large model. With `profile_dir`,
    one more call of each of our parts (train: `train_iters` steps) runs under
    `jax.profiler.trace(profile_dir/PART)` after the timings, and a per-op
    summary of each trace is printed and returned under `profile`.
  """
  if compare not in COMPARE:
    raise ValueError(f"--compare must be one of {COMPARE}, got {compare!r}.")
  if not parts or set(parts) - set(PARTS):
    raise ValueError(f"--parts must be a non-empty subset of {','.join(PARTS)}, got "
                     f"{','.join(parts)!r}.")
  parts = tuple(p for p in PARTS if p in parts)
  if batch_size < 1 or repeats < 1 or train_iters < 1:
    raise ValueError(f"batch_size ({batch_size}), repeats ({repeats}) and train_iters "
                     f"({train_iters}) must be >= 1.")
  if steps_per_call < 1 or train_iters % steps_per_call:
    raise ValueError(f"--train_iters ({train_iters}) must be a multiple of "
                     f"--steps_per_call ({steps_per_call}).")
  num_t = int(config.diffusion.num_timesteps)
  if not 1 <= sample_steps <= num_t:
    raise ValueError(f"--sample_steps must be in 1..{num_t}, got {sample_steps}.")
  if torch_threads is not None and torch_threads < 1:
    raise ValueError(f"--torch_threads must be >= 1 (or unset for all cores), got "
                     f"{torch_threads}.")
  config = copy.deepcopy(config)
  config.training.steps_per_call = steps_per_call
  if compare == "diffusers" and config.model.dtype != "float32":
    raise ValueError("--compare diffusers runs float32 on both sides; drop --dtype "
                     f"{config.model.dtype} (or compare none).")
  if compare == "diffusers":
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    peer.check_config(config, torch_threads)  # before our programs compile (minutes)
  if profile_dir:
    measure.check_output_dir(profile_dir, "--profile")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}[config.model.dtype]
  result: dict[str, Any] = dict(
      machine=measure.machine_info(),
      setup=dict(batch_size=batch_size, repeats=repeats, train_iters=train_iters,
                 steps_per_call=steps_per_call,
                 conv_algorithm=config.model.get("conv_algorithm", "auto"), parts=list(parts),
                 remat=bool(config.model.remat),
                 sample_steps=sample_steps, dtype=config.model.dtype, peak_tflops=peak_tflops,
                 image_size=int(config.data.image_size), channels=int(config.data.channels),
                 ch=int(config.model.ch), ch_mult=list(config.model.ch_mult)))
  log(f"machine: {result['machine']}")
  matmul = lambda: measure.matmul_peak_gflops(dtype, matmul_size, repeats=3)
  log(f"matmul peak ({config.model.dtype} jnp.dot): {matmul():.1f} GFLOP/s (re-measured "
      "every repeat)")

  ours = Ours(config, batch_size, sample_steps, seed, parts)
  log(f"ours: {ours.num_params:,} params; compile " + ", ".join(
      f"{k} {v:.1f} s" for k, v in ours.compile_s.items()))
  theirs = None
  if compare == "diffusers":
    theirs = peer_process.PeerProcess(Theirs, config, batch_size, sample_steps, seed,
                                      torch_threads, parts)
  try:
    their_params = theirs.describe()["num_params"] if theirs is not None else ours.num_params
    if their_params != ours.num_params:
      raise AssertionError(f"Not the same network: ours {ours.num_params:,} params, diffusers "
                           f"{their_params:,}.")

    times = {k: {"ours": [], "theirs": []} for k in parts}
    cpu_times = {k: {"ours": [], "theirs": []} for k in times}
    matmul_gflops = []
    for r in range(repeats):
      # The peak is re-measured beside the forward passes it is compared with,
      # so a change of load on a shared machine hits both.
      matmul_gflops.append(matmul())
      for kind in parts:
        args = (train_iters,) if kind == "train" else ()
        for name, side in (("ours", ours), ("theirs", theirs)):
          if side is not None:
            # One untimed call first, so each timed call follows one of
            # its own side, as in a real run (caches and thread pools warm).
            if theirs is not None:
              getattr(side, kind)(*([1] if kind == "train" else []))
            wall, cpu = getattr(side, kind)(*args)
            times[kind][name].append(wall)
            cpu_times[kind][name].append(cpu)
      log(f"repeat {r + 1}/{repeats}: matmul {matmul_gflops[-1]:.1f} GFLOP/s, wall " + ", ".join(
          f"{k} {v['ours'][-1]:.3f} s" + (f" (theirs {v['theirs'][-1]:.3f} s)" if theirs else "")
          for k, v in times.items()))

    def rates(name):
      t = times
      out = dict(cpu_s={})
      if "train" in parts:
        out["train_images_per_s"] = measure.summary(
            [batch_size * train_iters / s for s in t["train"][name]])
        out["cpu_s"]["train_step"] = measure.summary(
            [c / train_iters for c in cpu_times["train"][name]])
      if "sample" in parts:
        out["sample_evals_per_s"] = measure.summary(
            [batch_size * sample_steps / s for s in t["sample"][name]])
        out["cpu_s"]["sample_step"] = measure.summary(
            [c / sample_steps for c in cpu_times["sample"][name]])
        if ours.forward_flops:
          out["sample_gflops"] = measure.summary(
              [ours.forward_flops * sample_steps / s / 1e9 for s in t["sample"][name]])
      if "forward" in parts:
        out["forward_s"] = measure.summary(t["forward"][name])
        out["cpu_s"]["forward"] = measure.summary(cpu_times["forward"][name])
        if ours.forward_flops:
          out["forward_gflops"] = measure.summary(
              [ours.forward_flops / s / 1e9 for s in t["forward"][name]])
          out["forward_fraction_of_matmul"] = measure.summary(
              [ours.forward_flops / s / 1e9 / m
               for s, m in zip(t["forward"][name], matmul_gflops)])
      if "train" in parts and ours.train_flops:
        out["train_gflops"] = measure.summary(
            [ours.train_flops * train_iters / s / 1e9 for s in t["train"][name]])
        out["train_fraction_of_matmul"] = measure.summary(
            [ours.train_flops * train_iters / s / 1e9 / m
             for s, m in zip(t["train"][name], matmul_gflops)])
        if peak_tflops:
          out["train_mfu"] = measure.summary(
              [ours.train_flops * train_iters / s / 1e12 / peak_tflops for s in t["train"][name]])
      return out

    result["matmul_gflops"] = measure.summary(matmul_gflops)
    result["ours"] = rates("ours")
    result["ours"].update(
        num_params=ours.num_params, forward_gflop=(ours.forward_flops or 0) / 1e9,
        train_step_gflop=(ours.train_flops or 0) / 1e9,
        compile_s=ours.compile_s, program_bytes=ours.program_bytes)
    if theirs is not None:
      result["theirs"] = rates("theirs")
      result["theirs"].update(theirs.describe())
      # Higher is better for all three: ours/theirs throughput per repeat.
      result["ratio"] = {
          kind: measure.summary([b / a for a, b in zip(times[kind]["ours"],
                                                       times[kind]["theirs"])])
          for kind in times}
      result["ratio_cpu_time"] = {
          kind: measure.summary([b / a for a, b in zip(cpu_times[kind]["ours"],
                                                       cpu_times[kind]["theirs"])])
          for kind in times}
    if profile_dir:
      from benchmarks import trace_summary  # pylint: disable=g-import-not-at-top
      result["profile"] = {}
      for kind in parts:
        where = os.path.join(profile_dir, kind)
        with jax.profiler.trace(where):
          getattr(ours, kind)(*([train_iters] if kind == "train" else []))
        steps = {"train": train_iters, "sample": sample_steps}.get(kind, 1)
        summary = trace_summary.summarize(where, steps,
                                          unit="call" if kind == "forward" else "step")
        log(f"== profile of ours, {kind} ({summary['per']}):")
        trace_summary.report(summary, top=15, log=log)
        result["profile"][kind] = summary
    result["peak_memory"] = measure.peak_memory()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
  finally:
    if theirs is not None:
      theirs.close()
  report(result, log)
  return result


def report(result: dict, log=print) -> None:
  """Prints the summary table of `run_benchmark`'s result."""
  o = result["ours"]
  log("")
  log(f"== ddpm_jax, batch {result['setup']['batch_size']}, {result['setup']['dtype']}, "
      f"{o['num_params']:,} params, median (min, max) over {result['setup']['repeats']} repeats")
  if "train_images_per_s" in o:
    log(f"train images/s:         {measure.fmt(o['train_images_per_s'])}")
  if "sample_evals_per_s" in o:
    log(f"sample evals/s:         {measure.fmt(o['sample_evals_per_s'])}")
  if "forward_gflops" in o:
    log(f"forward GFLOP/s:        {measure.fmt(o['forward_gflops'])} "
        f"({o['forward_gflop']:.2f} GFLOP per batch)")
    log(f"forward / matmul peak:  {measure.fmt(o['forward_fraction_of_matmul'])} "
        f"(per repeat; matmul {measure.fmt(result['matmul_gflops'])} GFLOP/s)")
  if "train_gflops" in o:
    log(f"train GFLOP/s:          {measure.fmt(o['train_gflops'])} "
        f"({o['train_step_gflop']:.2f} GFLOP per step)")
    log(f"train / matmul peak:    {measure.fmt(o['train_fraction_of_matmul'])}")
  if "train_mfu" in o:
    log(f"train MFU:              {measure.fmt(o['train_mfu'])} (of {result['setup']['peak_tflops']} "
        "TFLOP/s nominal)")
  log("compile s:              " + ", ".join(f"{k} {v:.1f}" for k, v in o["compile_s"].items()))
  log("XLA program memory:     " + ", ".join(
      f"{k} {v / 2**20:.0f} MiB" for k, v in o["program_bytes"].items() if v))
  pm = result["peak_memory"]
  log(f"peak memory:            {pm['bytes'] / 2**20:.0f} MiB ({pm['source']})")
  if "theirs" in result:
    t = result["theirs"]
    log(f"== diffusers UNet2DModel (torch on {t['device']}, {t['torch_threads']} threads), "
        f"{t['num_params']:,} params")
    log(f"peak memory:            {t['peak_memory']['bytes'] / 2**20:.0f} MiB "
        f"({t['peak_memory']['source']}, its own process)")
    if "train_images_per_s" in t:
      log(f"train images/s:         {measure.fmt(t['train_images_per_s'])}")
    if "sample_evals_per_s" in t:
      log(f"sample evals/s:         {measure.fmt(t['sample_evals_per_s'])}")
    if "forward_gflops" in t:
      log(f"forward GFLOP/s:        {measure.fmt(t['forward_gflops'])} (same FLOP count)")
    log("== ours / theirs (throughput ratio per repeat; > 1: we are faster)")
    for kind, s in result["ratio"].items():
      log(f"{kind + ':':<24}{measure.fmt(s)}")
    log("== the same from CPU seconds (all threads; steadier under load with 1 thread each)")
    for kind, s in result["ratio_cpu_time"].items():
      log(f"{kind + ':':<24}{measure.fmt(s)}")


def main(argv: Optional[list[str]] = None, reuse_scratch: bool = False) -> int:
  """The command line; `reuse_scratch`: call `cpu_memory.reuse_scratch()` first (as a command)."""
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.throughput", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py",
                      help="config file[:arg] (default configs/cifar10.py)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute dtype (default: the config's model.dtype)")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise ResNet blocks (model.remat), e.g. for the 256x256 "
                      "models at batch 64 on one GPU")
  parser.add_argument("--conv_algorithm", choices=("auto", "direct", "winograd"),
                      default=None, help="our 3x3 convolutions (model.conv_algorithm; "
                      "default: the config's, 'auto' = Winograd on CPU)")
  parser.add_argument("--attention_algorithm", choices=("einsum", "cudnn"), default=None,
                      help="model.attention_algorithm (default: the config's; 'cudnn' "
                      "needs a GPU and --dtype bfloat16)")
  parser.add_argument("--compare", choices=COMPARE, default="none")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help="what to compile and time, comma-separated subset of "
                      f"{','.join(PARTS)} (default all; e.g. 'train' for the training "
                      "memory of a large model)")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch intra-op threads (default: all cores). For a one-thread "
                      "comparison also run JAX single-threaded: XLA_FLAGS="
                      "'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'")
  parser.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 1)")
  parser.add_argument("--train_iters", type=int, default=None,
                      help="train steps per repeat (default 2; --quick: 1)")
  parser.add_argument("--sample_steps", type=int, default=None,
                      help="ancestral steps per timed sampling chunk (default 4; --quick: 2)")
  parser.add_argument("--steps_per_call", type=int, default=1,
                      help="our train steps per compiled call (training.steps_per_call: "
                      "a lax.scan over K batches); --train_iters must be a multiple")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 1 repeat, 1 train step, 2 sampling steps unless given "
                      "explicitly (well under "
                      "a minute with --config configs/digits.py:test; the CIFAR-10 train "
                      "step alone compiles in ~1 min on 2 cores)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the chip's nominal peak TFLOP/s for --dtype, for the train MFU "
                      "(e.g. 989 for an H100 SXM in bfloat16)")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="after the timings, trace one more call of each part with "
                      "jax.profiler into DIR/PART and print where the time goes")
  parser.add_argument("--json", default=None, help="also write every number to this file")
  args = parser.parse_args(argv)
  # Explicit flags win over --quick's sizes, which win over the defaults.
  sizes = dict(repeats=(1, 5), train_iters=(1, 2), sample_steps=(2, 4))
  for name, (quick, default) in sizes.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else default)
  try:
    if args.json:
      measure.check_output_file(args.json, "--json")
    scratch = cpu_memory.reuse_scratch() if reuse_scratch else "not set"
    print(f"XLA CPU scratch reuse (ddpm_jax.cpu_memory): {scratch}", flush=True)
    config = measure.load_config(args.config)
    if args.dtype:
      config.model.dtype = args.dtype
    if args.remat:
      config.model.remat = True
    if args.conv_algorithm:
      config.model.conv_algorithm = args.conv_algorithm
    if args.attention_algorithm:
      config.model.attention_algorithm = args.attention_algorithm
    result = run_benchmark(config, batch_size=args.batch_size, repeats=args.repeats,
                           train_iters=args.train_iters, sample_steps=args.sample_steps,
                           steps_per_call=args.steps_per_call,
                           compare=args.compare, torch_threads=args.torch_threads,
                           peak_tflops=args.peak_tflops,
                           parts=tuple(p for p in args.parts.split(",") if p),
                           profile_dir=args.profile)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["cpu_memory"] = scratch
  result["command"] = "python -m benchmarks.throughput " + " ".join(
      sys.argv[1:] if argv is None else argv)
  if args.json:
    measure.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  # As the ddpm_jax commands do, before JAX starts (the peer's process too).
  sys.exit(main(reuse_scratch=True))
