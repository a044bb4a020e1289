"""Step time of SGD, SAM and SANER against model size and batch size on this CPU.

For every model (ResNet-8, ResNet-20, ResNet-18, CIFAR-style, 32x32x3 random
images) and batch size, the three steps of ``benchmarks/step_time.py`` are
jitted and timed interleaved (each round runs one step of each, in a rotated
order), on the default convolution path (``saner_jax.cpu_conv.choose``).
Reported: median step time, images/s, SAM/SGD and SANER/SAM. It shows how the
cost grows with the work and that SANER's reweighting stays a small share of
a SAM step at every size.

Usage::

  python benchmarks/scaling.py                      # the results file (few rounds: this CPU is shared)
  python benchmarks/scaling.py --models resnet8 --batch-sizes 8 --rounds 1 --out ''   # smoke

Writes ``<out>.json`` and ``<out>.txt``.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_time  # the same steps as the step-time benchmark

from saner_jax import cpu_conv
from saner_jax.train import models, reporting

METHODS = ("sgd", "sam", "saner")


def time_size(model, batch_size: int, args) -> dict[str, list[float]]:
  """Seconds per step of each method, one value per round, after one untimed (compiling) step."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32)
  params, batch_stats = models.init_model(model, jax.random.key(0), (32, 32, 3))
  hyper = argparse.Namespace(lr=0.1, wd=5e-4, rho=0.05, alpha=0.5, gsam_alpha=0.01)
  steps, carries = {}, {}
  for method in METHODS:
    init, step = step_time.build_step(method, model, hyper)
    steps[method] = jax.jit(step)
    opt_state, p_state = init(params)
    carries[method], loss = steps[method]((params, batch_stats, opt_state, p_state), x, y)
    jax.block_until_ready(carries[method])
  times = {m: [] for m in METHODS}
  for round_ in range(args.rounds):
    order = METHODS[round_ % 3 :] + METHODS[: round_ % 3]
    for method in order:
      start = time.perf_counter()
      carries[method], loss = steps[method](carries[method], x, y)
      jax.block_until_ready((carries[method], loss))
      times[method].append(time.perf_counter() - start)
  return times


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet18"])
  parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512])
  parser.add_argument("--rounds", type=int, default=3, help="timed steps per method and size")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scaling"))
  args = parser.parse_args(argv)
  out = io.StringIO()

  def say(line=""):
    print(line, flush=True)
    out.write(line + "\n")

  choice = cpu_conv.choose()
  command = shlex.join(["python", "benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)])
  say(f"command: {command}")
  say(f"git: {reporting.git_revision()}")
  say(f"jax {jax.__version__}, {os.cpu_count()} CPUs; convolutions: {choice.reason}")
  say(f"median of {args.rounds} interleaved rounds per size, after one compiling step")
  say()
  say(
    f"{'model':<9} {'batch':>5} {'SGD ms':>9} {'SAM ms':>9} {'SANER ms':>9} {'SANER img/s':>11} {'SAM/SGD':>8} {'SANER/SAM':>9}"
  )
  rows = []
  for name in args.models:
    model = models.create_model(name, 10, conv_general_dilated=choice.conv)
    for batch_size in args.batch_sizes:
      times = time_size(model, batch_size, args)
      median = {m: statistics.median(t) for m, t in times.items()}
      row = {
        "model": name,
        "batch_size": batch_size,
        "times_s": times,
        "median_s": median,
        "sam/sgd": median["sam"] / median["sgd"],
        "saner/sam": median["saner"] / median["sam"],
      }
      rows.append(row)
      say(
        f"{name:<9} {batch_size:>5} {1e3 * median['sgd']:9.1f} {1e3 * median['sam']:9.1f} "
        f"{1e3 * median['saner']:9.1f} {batch_size / median['saner']:11.0f} {row['sam/sgd']:8.3f} "
        f"{row['saner/sam']:9.3f}"
      )
  worst = max(rows, key=lambda r: r["saner/sam"])
  say(f"\nlargest SANER/SAM: {worst['saner/sam']:.3f} ({worst['model']}, batch {worst['batch_size']})")
  record = {"command": command, "git": reporting.git_revision(), "convolutions": choice.path, "rows": rows}
  if args.out:
    reporting.write_results(args.out, record, out.getvalue())
  return record


if __name__ == "__main__":
  main()
