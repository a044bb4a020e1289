"""Cost of one training epoch of each noise-robust pipeline, relative to the plain trainer.

Each pipeline runs through the trainer's own recipe (saner_jax.train.loop
and saner_jax.train.pipelines.recipes) on one config, by default the quick
Fashion-MNIST preset (2,000 images, ResNet-8, batch 128: 15 steps an epoch)
with SANER. An epoch is everything the pipeline does in it: its train steps
and its per-epoch passes (DivideMix's per-sample losses and mixture fit,
PLC's correction pass, Joint Optimization's label update), not the test
evaluation, which is the same for all. The pipelines are timed in their
main phase: DivideMix and PLC without warm-up, Joint Optimization in stage 1
(stage 2 is the plain trainer with soft labels).

After one untimed epoch each (the compiles), the pipelines run one epoch
each per round, in a rotated order, so load from other processes falls on
all of them alike; the median over rounds is reported, with its ratio to
the plain trainer's.

``--vary KEY VALUE ...`` times other variants of one config the same way,
for example the optimizers at a larger scale, to plan its runs: the report
then also gives a whole run's time (epochs x the median epoch, plus the
first epoch's compiles).

Usage::

  python benchmarks/pipeline_cost.py                                    # writes benchmarks/results/pipeline_cost.*
  python benchmarks/pipeline_cost.py --rounds 1 --set train_examples=256 --out /tmp/cost.json   # smoke run
  python benchmarks/pipeline_cost.py --vary optimizer sgd sam saner --rounds 3 \
      --set train_examples=10000 augment=true model=resnet20 epochs=100 --out benchmarks/results/scale_cost.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

from saner_jax.train import config as config_lib
from saner_jax.train import loop, reporting

# The main phase of each pipeline from its first epoch.
PIPELINES = {
  "none": {},
  "bootstrap": {},
  "co_teaching": {},
  "dividemix": {"pipeline_warmup_epochs": 0},
  "plc": {"pipeline_warmup_epochs": 0},
  "joint_optimization": {"jo_stage1_epochs": 29, "jo_update_start": 1},
}


def build(base: dict, variant: dict, out_dir: str):
  """The run, its recipe and initial state for one variant of ``base``."""
  values = {**base, **variant, "out_dir": out_dir, "checkpoint": False}
  values["progress"] = "none"
  run = loop.setup(config_lib.from_mapping(values).validate())
  parts = loop.recipe_of(run.config)(run)
  return parts, parts.init()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="fashion_mnist_quick")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
  parser.add_argument("--rounds", type=int, default=5, help="timed epochs per pipeline")
  parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
  parser.add_argument(
    "--vary", nargs="+", metavar="KEY VALUE", help="time these values of one config key instead of the pipelines"
  )
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pipeline_cost.json"))
  args = parser.parse_args(argv)
  base = {**config_lib.load_yaml(args.config), **dict(kv.split("=", 1) for kv in args.set)}
  base.setdefault("epochs", 30)
  command = shlex.join(["python", "benchmarks/pipeline_cost.py", *(sys.argv[1:] if argv is None else argv)])
  print(
    f"command: {command}\ngit: {reporting.git_revision()}\njax {jax.__version__}, {jax.devices()[0]}, {os.cpu_count()} CPUs"
  )

  if args.vary:
    if len(args.vary) < 2:
      parser.error("--vary: give a config key and at least one value")
    variants = {value: {args.vary[0]: value} for value in args.vary[1:]}
  else:
    variants = {p: {"pipeline": p, **PIPELINES[p]} for p in args.pipelines}
  names = list(variants)
  runs, compile_s = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for pipeline in names:
      parts, state = build(base, variants[pipeline], os.path.join(tmp, pipeline))
      start = time.perf_counter()
      state, _ = parts.epoch(state, 1)
      jax.block_until_ready(state)
      compile_s[pipeline] = time.perf_counter() - start
      runs[pipeline] = [parts, state]
      print(f"  first epoch of {pipeline:<20} {compile_s[pipeline]:.1f} s (with compiles)", flush=True)

    times: dict[str, list[float]] = {p: [] for p in names}
    for round_ in range(args.rounds):
      shift = round_ % len(names)
      for pipeline in names[shift:] + names[:shift]:
        parts, state = runs[pipeline]
        start = time.perf_counter()
        state, _ = parts.epoch(state, 2 + round_)
        jax.block_until_ready(state)
        times[pipeline].append(time.perf_counter() - start)
        runs[pipeline][1] = state

  median = {p: statistics.median(t) for p, t in times.items()}
  plain = median.get("none") if not args.vary else median[names[0]]
  epochs = int(base["epochs"])
  run_min = {p: (compile_s[p] + (epochs - 1) * median[p]) / 60 for p in names}
  lines = [
    f"{'pipeline' if not args.vary else args.vary[0]:<20} {'median s':>9} {'min s':>7} {'max s':>7} "
    f"{'x plain' if not args.vary else 'x ' + names[0]:>8} {f'{epochs}-epoch run':>14}"
  ]
  for p in names:
    ratio = f"{median[p] / plain:8.2f}" if plain else "       -"
    lines.append(f"{p:<20} {median[p]:9.2f} {min(times[p]):7.2f} {max(times[p]):7.2f} {ratio} {run_min[p]:10.1f} min")
  print("\n" + "\n".join(lines))
  result = {
    "command": command,
    "git_revision": reporting.git_revision(),
    "config": base,
    "rounds": args.rounds,
    "epoch_s": times,
    "median_epoch_s": median,
    "ratio_to_plain": {p: median[p] / plain for p in median} if plain else None,
    "first_epoch_s": compile_s,
    "run_minutes": run_min,
  }
  report = f"command: {command}\ngit: {result['git_revision']}\n\n" + "\n".join(lines)
  reporting.write_results(os.path.splitext(args.out)[0], result, report)
  return result


if __name__ == "__main__":
  main()
