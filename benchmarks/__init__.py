"""Benchmarks of ddpm_jax against the PyTorch peer (diffusers' UNet2DModel).

Run as module CLIs from the repository root, never as timed tests:

  python -m benchmarks.throughput --config configs/cifar10.py --batch_size 8 --compare diffusers
  python -m benchmarks.sample_time --config configs/cifar10.py --num_samples 8 --compare diffusers

`measure.py` holds timing, machine and memory helpers; `peer.py` the diffusers
model, PyTorch train step and scheduler loops. Results: `benchmarks/RESULTS.md`.
"""
