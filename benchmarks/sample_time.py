r"""Time to draw N samples: 1000 ancestral steps and DDIM-50, optionally vs diffusers.

  python -m benchmarks.sample_time --config configs/cifar10.py --num_samples 8 \
      --batch_size 8 --measured_steps 20 --compare diffusers
  # on a GPU: --num_samples 50000 --batch_size 1000 --measured_steps 100

Ours runs the sampler of `ddpm_jax.sample` (`sampling.sample_steps`: the
chain in compiled chunks of a `lax` loop, respaced with 'ddimK' for DDIM). The peer runs
the loop of diffusers' `DDPMPipeline` / `DDIMPipeline` (`unet(x, t).sample`
then `scheduler.step`) on the same network, in a process of its own
(`peer_process`). Each side times `measured_steps`
steps of one batch (interleaved, repeated, warm-up excluded); the time for N
samples is extrapolated as ceil(N / batch) * steps * (median time per step),
and printed as such. With measured_steps >= the chain length the whole chain
is timed and nothing is extrapolated along the chain.
"""
import argparse
import copy
import math
import sys
from typing import Any, Optional

import jax

from benchmarks import measure
from benchmarks import peer_process
from ddpm_jax import cpu_memory

COMPARE = ("none", "diffusers")


def _ours(config, sampler: str, steps: Optional[int], batch_size: int, measured: int,
          seed: int):
  """`(timer, num_steps, compile_s)` for our chain of one batch."""
  from benchmarks import throughput  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  d = models.create_diffusion(config)
  if steps is not None:
    d = sampling.respace(d, f"ddim{steps}")[0]
  model = models.create_model(config)
  # Jitted and at batch 1 (the parameters do not depend on the batch): an
  # eager init at a GPU batch of thousands dispatched op by op for minutes.
  params = jax.jit(lambda key: model.init({"params": key}, *ts.init_inputs(config, 1)))(
      jax.random.PRNGKey(seed))["params"]
  keys = throughput.example_keys(seed, batch_size)
  x_t = jax.random.normal(jax.random.PRNGKey(seed + 1),
                          ts.init_inputs(config, batch_size)[0].shape)
  num = d.num_timesteps
  measured = min(measured, num)
  args = (params, d, x_t, keys, num, num - measured)
  chain = throughput.make_chain_fn(model, sampler)
  holder = {}
  compile_s = measure.timed(lambda: holder.setdefault("c", chain.lower(*args).compile()))
  compiled = holder["c"]
  timer = lambda: measure.timed_wall_cpu(lambda: compiled(*args).block_until_ready())
  timer()  # warm-up
  return timer, num, measured, compile_s


class TheirChains:
  """The peer's chains (diffusers' pipeline loop); built in its own process (`peer_process`)."""

  def __init__(self, config, batch_size: int, seed: int, threads: Optional[int]):
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    self._config, self._batch_size, self._seed = config, batch_size, seed
    self._unet = peer.create_unet(config, seed, threads)
    self._timer = None

  def torch_threads(self) -> int:
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    return peer.setup_torch().get_num_threads()

  def prepare(self, sampler: str, steps: Optional[int], measured: int) -> tuple[int, int]:
    """Sets up the chain `time()` runs; returns (its steps, the steps timed)."""
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    timesteps, init, run = peer.make_sampler(self._config, self._unet, self._batch_size,
                                             sampler=sampler, num_inference_steps=steps,
                                             seed=self._seed)
    x = init()
    part = timesteps[:measured]
    self._timer = lambda: measure.timed_wall_cpu(lambda: run(x, part))
    self._timer()  # warm-up
    return len(timesteps), len(part)

  def time(self) -> tuple[float, float]:
    return self._timer()


def run_benchmark(config, *, num_samples: int, batch_size: int, measured_steps: int = 20,
                  ddim_steps: int = 50, repeats: int = 3, compare: str = "none",
                  torch_threads: Optional[int] = None,
                  seed: int = 0, log=print) -> dict[str, Any]:
  """Times both samplers (and the peer); returns every number.

  Returns:
    dict with `machine`, `setup` and per sampler ('ancestral', 'ddim{K}') a
    dict: `steps`, `measured_steps`, `ours` / `theirs` with `step_s` (summary
    over repeats of wall seconds per step of one batch), `step_cpu_s` (CPU
    seconds, all threads) and `total_s` (the extrapolated wall seconds for
    `num_samples`), and `ratio` / `ratio_cpu_time` (theirs/ours time, > 1: we
    are faster).
  """
  if compare not in COMPARE:
    raise ValueError(f"--compare must be one of {COMPARE}, got {compare!r}.")
  for name, v in (("num_samples", num_samples), ("batch_size", batch_size),
                  ("measured_steps", measured_steps), ("ddim_steps", ddim_steps),
                  ("repeats", repeats)):
    if v < 1:
      raise ValueError(f"--{name} must be >= 1, got {v}.")
  num_t = int(config.diffusion.num_timesteps)
  if ddim_steps > num_t:
    raise ValueError(f"--ddim_steps must be in 1..{num_t} (diffusion.num_timesteps), got "
                     f"{ddim_steps}.")
  if torch_threads is not None and torch_threads < 1:
    raise ValueError(f"--torch_threads must be >= 1 (or unset for all cores), got "
                     f"{torch_threads}.")
  config = copy.deepcopy(config)
  if compare == "diffusers" and config.model.dtype != "float32":
    raise ValueError("--compare diffusers runs float32 on both sides; drop --dtype "
                     f"{config.model.dtype}.")
  if compare == "diffusers":
    from benchmarks import peer  # pylint: disable=g-import-not-at-top
    peer.check_config(config, torch_threads)  # before anything compiles
  batch_size = min(batch_size, num_samples)
  num_batches = math.ceil(num_samples / batch_size)
  result: dict[str, Any] = dict(
      machine=measure.machine_info(),
      setup=dict(num_samples=num_samples, batch_size=batch_size, num_batches=num_batches,
                 measured_steps=measured_steps, repeats=repeats, dtype=config.model.dtype))
  log(f"machine: {result['machine']}")
  theirs = None
  if compare == "diffusers":
    theirs = peer_process.PeerProcess(TheirChains, config, batch_size, seed, torch_threads)
    result["setup"]["torch_threads"] = theirs.torch_threads()
  try:
    _time_samplers(config, result, theirs, num_samples=num_samples, batch_size=batch_size,
                   num_batches=num_batches, measured_steps=measured_steps,
                   ddim_steps=ddim_steps, repeats=repeats, seed=seed, log=log)
  finally:
    if theirs is not None:
      theirs.close()
  result["peak_memory"] = measure.peak_memory()
  return result


def _time_samplers(config, result, theirs, *, num_samples, batch_size, num_batches,
                   measured_steps, ddim_steps, repeats, seed, log) -> None:
  """Fills `result[label]` for both samplers (see `run_benchmark`)."""
  for sampler, steps in (("ancestral", None), ("ddim", ddim_steps)):
    label = "ancestral" if steps is None else f"ddim{steps}"
    ours, num, measured, compile_s = _ours(config, sampler, steps, batch_size,
                                           measured_steps, seed)
    sides = {"ours": ours}
    if theirs is not None:
      their_num, their_measured = theirs.prepare(sampler, steps, measured_steps)
      if (their_num, their_measured) != (num, measured):
        raise AssertionError(f"{label}: peer chain has {their_num} steps ({their_measured} "
                             f"timed), ours {num} ({measured}).")
      sides["theirs"] = theirs.time
    step_times = {name: [] for name in sides}
    step_cpu = {name: [] for name in sides}
    for _ in range(repeats):
      for name, timer in sides.items():  # interleaved: ours, theirs, ours, ...
        wall, cpu = timer()
        step_times[name].append(wall / measured)
        step_cpu[name].append(cpu / measured)
    entry: dict[str, Any] = dict(steps=num, measured_steps=measured,
                                 extrapolated=measured < num or num_batches > 1,
                                 ours_compile_s=compile_s)
    for name, values in step_times.items():
      per_step = measure.summary(values)
      entry[name] = dict(step_s=per_step, step_cpu_s=measure.summary(step_cpu[name]),
                         total_s=per_step["median"] * num * num_batches)
    if "theirs" in step_times:
      entry["ratio"] = measure.summary(
          [b / a for a, b in zip(step_times["ours"], step_times["theirs"])])
      entry["ratio_cpu_time"] = measure.summary(
          [b / a for a, b in zip(step_cpu["ours"], step_cpu["theirs"])])
    result[label] = entry
    how = (f"extrapolated from {measured} of {num} steps on 1 of {num_batches} batch(es)"
           if entry["extrapolated"] else "measured")
    log(f"{label}: {num_samples} samples, batch {batch_size}, {num} steps ({how}):")
    for name in step_times:
      log(f"  {name:<7} {entry[name]['total_s']:.1f} s total; per batch step "
          f"{measure.fmt(entry[name]['step_s'])} s")
    if "ratio" in entry:
      log(f"  ours/theirs speed: {measure.fmt(entry['ratio'])}; from CPU seconds "
          f"{measure.fmt(entry['ratio_cpu_time'])}")


def main(argv: Optional[list[str]] = None, reuse_scratch: bool = False) -> int:
  """The command line; `reuse_scratch`: call `cpu_memory.reuse_scratch()` first (as a command)."""
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.sample_time", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--num_samples", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--measured_steps", type=int, default=None,
                      help="steps timed per chain (the rest is extrapolated; default 20, "
                      "--quick: 2)")
  parser.add_argument("--ddim_steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--attention_algorithm", choices=("einsum", "cudnn"), default=None,
                      help="model.attention_algorithm (default: the config's; 'cudnn' "
                      "needs a GPU and --dtype bfloat16)")
  parser.add_argument("--compare", choices=COMPARE, default="none")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch intra-op threads (default: all cores). For a one-thread "
                      "comparison also run JAX single-threaded: XLA_FLAGS="
                      "'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 1 repeat of 2 timed steps unless given explicitly (well "
                      "under a minute with "
                      "--config configs/digits.py:test)")
  parser.add_argument("--json", default=None, help="also write every number to this file")
  args = parser.parse_args(argv)
  # Explicit flags win over --quick's sizes, which win over the defaults.
  for name, (quick, default) in dict(repeats=(1, 3), measured_steps=(2, 20)).items():
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
    if args.attention_algorithm:
      config.model.attention_algorithm = args.attention_algorithm
    result = run_benchmark(config, num_samples=args.num_samples, batch_size=args.batch_size,
                           measured_steps=args.measured_steps, ddim_steps=args.ddim_steps,
                           repeats=args.repeats, compare=args.compare,
                           torch_threads=args.torch_threads)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["cpu_memory"] = scratch
  result["command"] = "python -m benchmarks.sample_time " + " ".join(
      sys.argv[1:] if argv is None else argv)
  if args.json:
    measure.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  # As the ddpm_jax commands do, before JAX starts (the peer's process too).
  sys.exit(main(reuse_scratch=True))
