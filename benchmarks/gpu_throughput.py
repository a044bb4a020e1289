"""Training throughput and model FLOP utilisation of SGD, SAM and SANER on one accelerator.

The trainer's own jitted step (``saner_jax.train.step.make_train_step``: the
batch gathered from a device-resident uint8 dataset, random crop and flip,
normalisation, the passes, the optax update and the epoch metrics, with the
state donated) on a CIFAR-style ResNet-18, random CIFAR-shaped data
(32x32x3, 10 classes) and bfloat16 compute with float32 parameters. Per
method:

  images/s   batch size / median step time; a step is timed as the mean over
             a window of steps dispatched back to back and waited on at the
             end (as the trainer runs them), the median taken over windows
  TFLOP/s    XLA's cost analysis of the compiled step (its "flops": every
             floating-point operation of the step, the two passes of SAM
             included) / the median step time
  MFU        TFLOP/s / the device's peak dense bf16 TFLOP/s (a table of known
             devices, or --peak-tflops); none where neither applies (a CPU)

Needs only jax, flax, optax, chex (no TFDS, no TensorFlow: the data are
made here). Usage::

  python benchmarks/gpu_throughput.py                      # ResNet-18, batch 512
  python benchmarks/gpu_throughput.py --profile /tmp/trace  # also a jax.profiler trace of SANER
  python benchmarks/gpu_throughput.py --model resnet8 --batch-size 8 --image-size 8 --dataset-size 16 \\
      --warmup 1 --windows 2 --window 2 --out ''   # CPU smoke

Writes ``<out>.json`` (every timing, the command, git revision, device) and
``<out>.txt`` (the report as printed).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

from saner_jax.train import data as data_lib
from saner_jax.train import device_input, models, reporting
from saner_jax.train import step as step_lib
from saner_jax.train.config import TrainConfig

METHODS = ("sgd", "sam", "saner")
# Peak dense bfloat16 tensor-core FLOP/s, from the vendors' data sheets, by a
# substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name in device_kind:
      return tflops
  return None


def build(method: str, args) -> tuple[Any, Any, tuple]:
  """The jitted step of ``method``, its compiled cost and its first arguments."""
  config = TrainConfig(
    model=args.model,
    optimizer=method,
    dtype=args.dtype,
    batch_size=args.batch_size,
    epochs=200,
    alpha_warmup_epochs=50,
    cpu_conv="false",
  )
  steps_per_epoch = args.dataset_size // args.batch_size
  model = models.create_model(args.model, 10, dtype=config.compute_dtype)
  optimizer = step_lib.build_optimizer(config, steps_per_epoch)
  state = step_lib.init_state(model, optimizer, jax.random.key(0), (args.image_size, args.image_size, 3))
  step = jax.jit(
    step_lib.make_train_step(model, optimizer, config, data_lib.get_spec("cifar10")), donate_argnums=(0, 1)
  )
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.dataset_size, args.image_size, args.image_size, 3), np.uint8)
  data = device_input.to_device(images, rng.integers(0, 10, args.dataset_size))
  permutation = device_input.epoch_permutation(jax.random.key(1), 1, args.dataset_size)
  first = (state, step_lib.zero_metrics(), data, permutation, 0, jax.random.key(2))
  start = time.perf_counter()
  compiled = step.lower(*first).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, {"flops": float(cost["flops"]), "compile_s": compile_s, "steps_per_epoch": steps_per_epoch}, first


def time_method(compiled, info, first, args) -> list[float]:
  """Seconds per step, one value per window."""
  state, metrics, data, permutation, _, key = first
  i = 0

  def run(n):
    nonlocal state, metrics, i
    for _ in range(n):
      state, metrics = compiled(state, metrics, data, permutation, i % info["steps_per_epoch"], key)
      i += 1
    jax.block_until_ready((state, metrics))

  run(args.warmup)
  per_step = []
  for _ in range(args.windows):
    start = time.perf_counter()
    run(args.window)
    per_step.append((time.perf_counter() - start) / args.window)
  if not np.isfinite(float(jax.device_get(metrics)["loss_sum"])):
    raise RuntimeError("non-finite loss: the benchmark's step is broken")
  return per_step


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--dataset-size", type=int, default=None, help="default: 50,000 or 4 batches if larger")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  parser.add_argument("--windows", type=int, default=10)
  parser.add_argument("--window", type=int, default=20, help="steps per timed window")
  parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: known devices)")
  parser.add_argument("--profile", default=None, help="write a jax.profiler trace of a SANER window here")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_throughput"))
  args = parser.parse_args(argv)
  if min(args.batch_size, args.warmup, args.windows, args.window) < 1:
    parser.error("--batch-size, --warmup, --windows and --window must be >= 1")
  args.dataset_size = args.dataset_size or max(50_000, 4 * args.batch_size)
  if args.dataset_size < args.batch_size:
    parser.error("--dataset-size must be at least --batch-size")

  out = io.StringIO()

  def say(line=""):
    print(line, flush=True)
    out.write(line + "\n")

  command = shlex.join(["python", "benchmarks/gpu_throughput.py", *(sys.argv[1:] if argv is None else argv)])
  device = jax.devices()[0]
  peak = args.peak_tflops or peak_tflops(device.device_kind)
  say(f"command: {command}")
  say(f"git: {reporting.git_revision()}")
  say(f"jax {jax.__version__}; device {device.platform} ({device.device_kind}) x{jax.device_count()}")
  say(
    f"model {args.model}, batch {args.batch_size}x{args.image_size}x{args.image_size}x3, {args.dtype}; "
    f"{args.windows} windows of {args.window} steps after {args.warmup} warm-up; peak {peak or 'unknown'} TFLOP/s"
  )
  results = {}
  for method in args.methods:
    compiled, info, first = build(method, args)
    per_step = time_method(compiled, info, first, args)
    median = statistics.median(per_step)
    tflops = info["flops"] / median / 1e12
    results[method] = {
      **info,
      "step_s": per_step,
      "median_step_s": median,
      "images_per_s": args.batch_size / median,
      "tflops_per_s": tflops,
      "mfu": tflops / peak if peak else None,
    }
    if args.profile and method == "saner":
      with jax.profiler.trace(args.profile):
        time_method(compiled, info, first, argparse.Namespace(**{**vars(args), "windows": 1, "warmup": 1}))
  say()
  say(f"{'method':<8} {'step ms':>9} {'images/s':>10} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9}")
  for method, r in results.items():
    mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     -"
    say(
      f"{method:<8} {1e3 * r['median_step_s']:9.2f} {r['images_per_s']:10.0f} {r['flops'] / 1e9:11.1f} "
      f"{r['tflops_per_s']:8.2f} {mfu} {r['compile_s']:9.1f}"
    )
  if {"sam", "saner"} <= results.keys():
    say(f"\nSANER/SAM step time {results['saner']['median_step_s'] / results['sam']['median_step_s']:.3f}")
  record = {
    "command": command,
    "git": reporting.git_revision(),
    "jax": jax.__version__,
    "device": f"{device.platform} ({device.device_kind})",
    "device_count": jax.device_count(),
    "peak_tflops": peak,
    "args": vars(args),
    "results": results,
  }
  if args.out:
    reporting.write_results(args.out, record, out.getvalue())
    print(f"wrote {args.out}.json and .txt")
  return record


if __name__ == "__main__":
  main()
