"""SANER's work beyond SAM's, counted by XLA rather than timed.

Timing ratios near 1 on a shared CPU scatter by several percent (see
``scaling.py``). This benchmark compiles the same SAM and SANER steps as
``step_time.py`` with XLA's own convolutions (so that the convolutions are
counted too; the oneDNN ones are opaque custom calls) and reads XLA's cost
analysis of each compiled step: floating-point operations and bytes
accessed. Their SANER/SAM ratios bound the extra work SANER's reweighting
adds, on every model and batch size, free of machine noise. Nothing is run.

  python benchmarks/saner_overhead.py
  python benchmarks/saner_overhead.py --models resnet8 --batch-sizes 8 --out ''   # smoke

Writes ``<out>.json`` and ``<out>.txt``.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_time  # the same steps as the step-time benchmark

from saner_jax.train import models, reporting

METHODS = ("sam", "saner")


def step_cost(model, method: str, batch_size: int) -> dict[str, float]:
  """XLA's cost analysis of one compiled training step."""
  x = jnp.zeros((batch_size, 32, 32, 3), jnp.float32)
  y = jnp.zeros(batch_size, jnp.int32)
  params, batch_stats = models.init_model(model, jax.random.key(0), (32, 32, 3))
  hyper = argparse.Namespace(lr=0.1, wd=5e-4, rho=0.05, alpha=0.5, gsam_alpha=0.01)
  init, step = step_time.build_step(method, model, hyper)
  opt_state, p_state = init(params)
  compiled = jax.jit(step).lower((params, batch_stats, opt_state, p_state), x, y).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"])}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet18"])
  parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 512])
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "saner_overhead"))
  args = parser.parse_args(argv)
  out = io.StringIO()

  def say(line=""):
    print(line, flush=True)
    out.write(line + "\n")

  command = shlex.join(["python", "benchmarks/saner_overhead.py", *(sys.argv[1:] if argv is None else argv)])
  say(f"command: {command}")
  say(f"git: {reporting.git_revision()}")
  say(f"jax {jax.__version__}; XLA's convolutions; XLA cost analysis of the compiled steps (nothing timed)")
  say()
  say(f"{'model':<9} {'batch':>5} {'SAM GFLOP':>10} {'SANER/SAM flops':>15} {'SAM MB':>9} {'SANER/SAM bytes':>15}")
  rows = []
  for name in args.models:
    model = models.create_model(name, 10)
    for batch_size in args.batch_sizes:
      cost = {m: step_cost(model, m, batch_size) for m in METHODS}
      row = {
        "model": name,
        "batch_size": batch_size,
        "cost": cost,
        "saner/sam flops": cost["saner"]["flops"] / cost["sam"]["flops"],
        "saner/sam bytes": cost["saner"]["bytes"] / cost["sam"]["bytes"],
      }
      rows.append(row)
      say(
        f"{name:<9} {batch_size:>5} {cost['sam']['flops'] / 1e9:10.2f} {row['saner/sam flops']:15.5f} "
        f"{cost['sam']['bytes'] / 1e6:9.1f} {row['saner/sam bytes']:15.5f}"
      )
  worst = max(max(r["saner/sam flops"], r["saner/sam bytes"]) for r in rows)
  say(f"\nlargest SANER/SAM ratio (flops or bytes): {worst:.5f}")
  record = {"command": command, "git": reporting.git_revision(), "rows": rows, "largest": worst}
  if args.out:
    reporting.write_results(args.out, record, out.getvalue())
  return record


if __name__ == "__main__":
  main()
