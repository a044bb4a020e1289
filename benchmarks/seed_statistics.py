"""Seed statistics of a set of runs: mean, std and paired 95% confidence intervals.

Reads ``<out_dir>/<run>_seed<k>/summary.json`` (the layout ``python -m
saner_jax.train compare`` writes) and prints a markdown report:

- per run, the mean and sample standard deviation over seeds of the test
  accuracy at the epoch of best validation accuracy (runs with a validation
  set), the last test accuracy, the mean test accuracy over the last 5
  epochs, the final memorisation (the share of noisy training samples
  predicted as their wrong, given label) and, as a diagnostic only, the
  maximum over epochs of the test accuracy (chosen on the test set);
- per pair of runs, the difference paired by seed (``B - A`` on the seeds both
  finished), its mean, standard deviation and a two-sided 95% confidence
  interval from Student's t with ``n - 1`` degrees of freedom.

A confidence interval that contains 0 means the seeds cannot tell the two runs
apart on that metric.

    python benchmarks/seed_statistics.py benchmarks/results/fashion_mnist/headline/sym40 \
        --pairs sam:saner sgd:sam

Several directories pool their runs, for example a group-substitution
experiment with the headline's SGD and SAM runs of the same seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np
from scipy import stats


def _percent(value):
  return None if value is None else 100 * value


# A metric is reported when every run has it: old summaries and runs without
# a validation set have no validation-selected accuracy or last-5 mean.
METRICS = {
  "test @ best val %": lambda s: _percent(s.get("test_acc_at_best_val")),
  "last test %": lambda s: _percent(s["last_test_acc"]),
  "last-5 mean test %": lambda s: _percent(s.get("mean_last5_test_acc")),
  "memorised %": lambda s: _percent(s["final"]["noisy_memorised"]),
  "max test % (diagnostic)": lambda s: _percent(s["best_test_acc"]),
}
# Left out of the report where a run is missing (an ablation directory holds SANER alone).
DEFAULT_PAIRS = ["sam:saner", "sgd:sam"]
_RUN_DIR = re.compile(r"^(?P<run>.+)_seed(?P<seed>\d+)$")


def load(out_dirs: list[pathlib.Path]) -> dict[str, dict[int, dict]]:
  """{run: {seed: summary}} for every finished run under the ``out_dirs``."""
  runs: dict[str, dict[int, dict]] = {}
  for out_dir in out_dirs:
    for summary in sorted(out_dir.glob("*_seed*/summary.json")):
      match = _RUN_DIR.match(summary.parent.name)
      if not match:
        continue
      by_seed = runs.setdefault(match["run"], {})
      seed = int(match["seed"])
      if seed in by_seed:
        raise SystemExit(
          f"error: {summary.parent.name} is in more than one of the directories given; give each run once"
        )
      by_seed[seed] = json.loads(summary.read_text())
  return runs


def paired(a: dict[int, dict], b: dict[int, dict], metric) -> tuple[int, float, float, float, float]:
  """(n, mean, std, ci_low, ci_high) of metric(b) - metric(a) over the seeds both have."""
  seeds = sorted(set(a) & set(b))
  diff = np.array([metric(b[s]) - metric(a[s]) for s in seeds])
  n = len(diff)
  if n < 2:
    return n, float(diff.mean()) if n else float("nan"), float("nan"), float("nan"), float("nan")
  mean, std = float(diff.mean()), float(diff.std(ddof=1))
  half = float(stats.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
  return n, mean, std, mean - half, mean + half


def report(out_dirs: list[pathlib.Path], pairs: list[tuple[str, str]], every_pair: bool = False) -> str:
  """The markdown report; a pair naming a run not found is left out, or with ``every_pair`` an error."""
  runs = load(out_dirs)
  if not runs:
    raise SystemExit(f"error: no finished runs (<run>_seed<k>/summary.json) under {' '.join(map(str, out_dirs))}")
  missing = sorted({name for pair in pairs for name in pair} - set(runs))
  if every_pair and missing:
    raise SystemExit(f"error: --pairs: no finished runs named {missing}; the runs found are {sorted(runs)}")
  metrics = {
    label: metric
    for label, metric in METRICS.items()
    if all(metric(s) is not None for by_seed in runs.values() for s in by_seed.values())
  }
  lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
  for name, by_seed in runs.items():
    cells = []
    for metric in metrics.values():
      values = np.array([metric(s) for s in by_seed.values()])
      std = values.std(ddof=1) if len(values) > 1 else float("nan")
      cells.append(f"{values.mean():.2f} ± {std:.2f}")
    lines.append(f"| {name} | {len(by_seed)} | " + " | ".join(cells) + " |")
  lines += ["", "| difference (paired by seed) | seeds | metric | mean | std | 95% CI |", "|---|---|---|---|---|---|"]
  for a, b in pairs:
    if a not in runs or b not in runs:
      continue
    for label, metric in metrics.items():
      n, mean, std, low, high = paired(runs[a], runs[b], metric)
      lines.append(f"| {b} − {a} | {n} | {label} | {mean:+.2f} | {std:.2f} | [{low:+.2f}, {high:+.2f}] |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "out_dirs", nargs="+", type=pathlib.Path, help="compare output directories (runs are pooled by name and seed)"
  )
  parser.add_argument(
    "--pairs",
    nargs="+",
    help="A:B pairs; the report gives B - A paired by seed (default: sam:saner sgd:sam, those of them found)",
  )
  args = parser.parse_args(argv)
  pairs = []
  for pair in args.pairs or DEFAULT_PAIRS:
    a, sep, b = pair.partition(":")
    if not sep or not a or not b:
      parser.error(f"--pairs: {pair!r} is not A:B (for example sam:saner)")
    pairs.append((a, b))
  for out_dir in args.out_dirs:
    if not out_dir.is_dir():
      parser.error(f"{out_dir} is not a directory")
  print(report(args.out_dirs, pairs, every_pair=args.pairs is not None))
  return 0


if __name__ == "__main__":
  sys.exit(main())
