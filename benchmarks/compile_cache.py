"""Cold and warm compile time of the main job's functions with JAX's persistent compilation cache.

Two fresh processes share one empty cache directory: the first compiles (cold)
and fills it, the second loads (warm). Each process times, for the main job's
preset (fashion_mnist_quick, ResNet-8, batch 128) on the default convolutions,
``jit(...).lower(...).compile()`` of the model's initialisation, the SGD, SAM
and SANER train steps and the evaluation over the 5,000 test images.

Usage::

  python benchmarks/compile_cache.py      # writes benchmarks/results/compile_cache.{json,txt}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

NAMES = ("init", "sgd", "sam", "saner", "evaluate")


def _compile_all() -> dict[str, float]:
  """One process's compile times (s), the cache set up as the trainer does."""
  import jax
  import jax.numpy as jnp

  from saner_jax import cpu_conv
  from saner_jax.train import compilation, config, device_input, models
  from saner_jax.train import step as step_lib

  compilation.enable_compilation_cache()
  base = config.from_mapping(config.load_yaml("fashion_mnist_quick"))
  model = models.create_model(base.model, 10, conv_general_dilated=cpu_conv.choose().conv)
  times = {}
  start = time.perf_counter()
  models.init_model(model, jax.random.key(0), (28, 28, 1))
  times["init"] = time.perf_counter() - start
  data = device_input.to_device(jnp.zeros((2000, 28, 28, 1), jnp.uint8), jnp.zeros(2000, jnp.int32))
  for optimizer in ("sgd", "sam", "saner"):
    cfg = config.from_mapping({"optimizer": optimizer}, base)
    opt = step_lib.build_optimizer(cfg, 15)
    state = step_lib.init_state(model, opt, jax.random.key(0), (28, 28, 1))
    step = step_lib.make_train_step(model, opt, cfg, base.spec)
    args = (state, step_lib.zero_metrics(), data, jnp.arange(2000), 0, jax.random.key(1))
    start = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    times[optimizer] = time.perf_counter() - start
  evaluate = step_lib.make_eval_step(model, base, base.spec)
  test = (jnp.zeros((5000, 28, 28, 1), jnp.uint8), jnp.zeros(5000, jnp.int32), jnp.ones(5000, bool))
  start = time.perf_counter()
  jax.jit(evaluate).lower(state.params, state.batch_stats, *test).compile()
  times["evaluate"] = time.perf_counter() - start
  return times


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compile_cache"))
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_compile_all()))
    return {}
  from saner_jax.train import reporting

  runs = {}
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "SANER_JAX_CACHE_DIR": cache, "PYTHONPATH": ROOT}
    for label in ("cold", "warm"):
      child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child"], env=env, capture_output=True, text=True, check=True
      )
      runs[label] = json.loads(child.stdout.strip().splitlines()[-1])
  lines = [
    "command: python benchmarks/compile_cache.py",
    f"git: {reporting.git_revision()}",
    "compile time (s) of the main job's functions, a fresh process each, one shared cache directory:",
    f"{'function':<10} {'cold':>7} {'warm':>7}",
    *(f"{n:<10} {runs['cold'][n]:7.2f} {runs['warm'][n]:7.2f}" for n in NAMES),
    f"{'total':<10} {sum(runs['cold'].values()):7.2f} {sum(runs['warm'].values()):7.2f}",
  ]
  print("\n".join(lines))
  record = {"command": "python benchmarks/compile_cache.py", "git": reporting.git_revision(), "seconds": runs}
  if args.out:
    reporting.write_results(args.out, record, "\n".join(lines))
  return record


if __name__ == "__main__":
  main()
