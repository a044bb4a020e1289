"""Test accuracy and memorisation against cost: one point per method, with 95% error bars.

Reads the runs of ``benchmarks/reproduce_cheap_sam.sh`` (the layout ``python -m
saner_jax.train compare`` writes: ``<dir>/<run>_seed<k>/``), from one directory
or several (the tuned comparison keeps SGD, SAM and SANER apart from the cheap
policies), and writes, into the first directory or ``--out``, ``cost.png`` (two
panels, test accuracy and memorisation against the cost) and ``cost.md`` (the
table behind it, and each method's difference from SANER paired by the seeds
both have, with its 95% interval).

- cost: gradient evaluations per run relative to SGD's, ``1 + sam_share``
  averaged over the epochs (SGD for twice the epochs counts 2), and the
  training wall time relative to SGD's, both means over seeds;
- test accuracy: validation-selected when the runs log ``val_acc`` (the test
  accuracy of the epoch with the best validation accuracy), else the last
  epoch's, and the table says which;
- memorisation: the last epoch's share of noisy training samples predicted as
  their wrong label.

Error bars are two-sided 95% Student-t intervals of the mean over seeds.

    python benchmarks/plot_cheap_sam.py benchmarks/results/fashion_mnist/cheap_sam/sym40 \
        --sgd_2x benchmarks/results/fashion_mnist/cheap_sam/sym40/sgd_2x
    python benchmarks/plot_cheap_sam.py benchmarks/results/fashion_mnist/tuned/sym40/final \
        benchmarks/results/fashion_mnist/cheap_sam/sym40_tuned --exclude saner_rerun \
        --sgd_2x benchmarks/results/fashion_mnist/cheap_sam/sym40_tuned/sgd_2x \
        --out benchmarks/results/fashion_mnist/cheap_sam/sym40_tuned
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_statistics  # the runs' layout and the paired intervals


def _history(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_point(run_dir: pathlib.Path, epochs_scale: float = 1.0) -> dict[str, float]:
  """One run's cost and results."""
  history = _history(run_dir)
  shares = [r.get("sam_share") for r in history]
  passes = 1.0 if shares[0] is None else 1.0 + float(np.mean(shares))
  if "val_acc" in history[0] and history[0]["val_acc"] is not None:
    test = max(history, key=lambda r: r["val_acc"])["test_acc"]
  else:
    test = history[-1]["test_acc"]
  return {
    "passes": passes * epochs_scale,
    "wall_s": float(sum(r["epoch_time_s"] for r in history)),
    "test": 100 * test,
    "memorised": 100 * history[-1]["noisy_memorised"],
    "validation_selected": "val_acc" in history[0],
  }


def interval(values: list[float]) -> tuple[float, float]:
  """Mean and the half-width of its two-sided 95% t-interval (nan with one seed)."""
  n = len(values)
  mean = float(np.mean(values))
  if n < 2:
    return mean, float("nan")
  return mean, float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))


def collect(
  run_dirs: list[pathlib.Path], sgd_2x: pathlib.Path | None, exclude: tuple[str, ...] = ()
) -> dict[str, dict[int, dict]]:
  """{method: {seed: point}} over the directories; SGD for twice the epochs is the method ``sgd_2x``."""
  points: dict[str, dict[int, dict]] = {}
  for out_dir in run_dirs:
    for name, by_seed in seed_statistics.load([out_dir]).items():
      if name in exclude:
        continue
      if name in points:
        raise SystemExit(f"error: runs named {name} are in two of the directories; --exclude one")
      points[name] = {seed: run_point(out_dir / f"{name}_seed{seed}") for seed in by_seed}
  if sgd_2x is not None:
    for name, by_seed in seed_statistics.load([sgd_2x]).items():
      points[f"{name}_2x"] = {seed: run_point(sgd_2x / f"{name}_seed{seed}", 2.0) for seed in by_seed}
  return points


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dirs", type=pathlib.Path, nargs="+", help="the directories of the runs")
  parser.add_argument("--sgd_2x", type=pathlib.Path, help="the directory of SGD run for twice the epochs")
  parser.add_argument("--exclude", nargs="*", default=[], help="run names to leave out")
  parser.add_argument("--out", type=pathlib.Path, help="where cost.png and cost.md go (default: the first directory)")
  parser.add_argument("--reference", default="saner", help="the run the paired differences are taken from")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  out_dir = args.out or args.run_dirs[0]
  points = collect(args.run_dirs, args.sgd_2x, tuple(args.exclude))
  if "sgd" not in points:
    where = " or ".join(str(d) for d in args.run_dirs)
    print(f"error: {where} holds no finished sgd runs, the unit of cost; run them first", file=sys.stderr)
    return 2
  sgd_wall = float(np.mean([p["wall_s"] for p in points["sgd"].values()]))
  selected = all(p["validation_selected"] for by_seed in points.values() for p in by_seed.values())
  accuracy = "validation-selected test %" if selected else "last test %"
  rows, summary = [], {}
  for name, by_seed in points.items():
    seeds = sorted(by_seed)
    cols = {key: interval([by_seed[s][key] for s in seeds]) for key in ("passes", "test", "memorised")}
    wall = float(np.mean([by_seed[s]["wall_s"] for s in seeds])) / sgd_wall
    summary[name] = {**cols, "wall": wall, "seeds": len(seeds)}
    line = f"| {name} | {len(seeds)} | {cols['passes'][0]:.2f} | {wall:.2f} |"
    for key in ("test", "memorised"):
      mean, half = cols[key]
      line += f" {mean:.2f} ± {half:.2f} |"
    if args.reference in points and name != args.reference:
      for key in ("test", "memorised"):
        ref = {s: {"v": p[key]} for s, p in points[args.reference].items()}
        mine = {s: {"v": p[key]} for s, p in by_seed.items()}
        _, diff, _, low, high = seed_statistics.paired(ref, mine, lambda r: r["v"])
        line += f" {diff:+.2f} [{low:+.2f}, {high:+.2f}] |"
    else:
      line += " - | - |"
    rows.append((cols["passes"][0], line))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((axes[0], "test", accuracy), (axes[1], "memorised", "memorised noisy labels %")):
    for name, s in summary.items():
      ax.errorbar(s["passes"][0], s[key][0], yerr=s[key][1], fmt="o", capsize=3)
      ax.annotate(name, (s["passes"][0], s[key][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("gradient evaluations per run (x SGD)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.suptitle(args.title or str(out_dir))
  fig.tight_layout()
  fig.savefig(out_dir / "cost.png", dpi=120)
  header = (
    f"| run | seeds | passes x SGD | wall x SGD | {accuracy} | memorised % | {accuracy} - {args.reference} "
    f"| memorised - {args.reference} |\n|---|---|---|---|---|---|---|---|\n"
  )
  table = header + "\n".join(line for _, line in sorted(rows)) + "\n"
  text = (
    f"# {args.title or out_dir}\n\nMeans ± 95% t-interval half-widths over seeds; differences paired by seed "
    f"with their 95% intervals. Wall x SGD is the runs' own training time, which a shared machine "
    f"makes noisy; benchmarks/cheap_sam_cost.py measures the step times in one run.\n\n{table}\n![cost](cost.png)\n"
  )
  (out_dir / "cost.md").write_text(text)
  print(table + f"figure: {out_dir / 'cost.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
