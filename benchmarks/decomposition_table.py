"""The clean/noisy gradient decomposition over training, as a markdown table.

Reads ``<out_dir>/<run>_seed<k>/metrics.jsonl`` of runs trained with
``--log_decomposition true`` (and optionally ``--sharpness_every N``) and
prints, per run and for a few epochs, what the paper's argument rests on:

- ``noisy-dom %``: the share of coordinates where the noisy samples' gradient
  outweighs the clean samples' (:math:`|n_i| > |c_i|`, opposite signs);
- ``P(B | noisy-dom)`` and ``P(B | clean-dom)``: how often such coordinates
  fall in group B (SAM shrank them); the paper argues the first is larger;
- ``amp clean`` and ``amp noisy``: the median of :math:`|c'_i|/|c_i|` and
  :math:`|n'_i|/|n_i|` on the noisy-dominated coordinates;
- ``noisy weight SAM / SANER``: the noisy part's weight in SAM's and SANER's
  update relative to SGD's (1 by definition), and ``clean weight SAM /
  SANER`` the same for the clean part;

and, last, the final epoch's Hessian top eigenvalue and trace where logged.

    python benchmarks/decomposition_table.py benchmarks/results/fashion_mnist/decomposition/sym40 \
        --epochs 1 5 10 15 20 30

With ``--mean`` the seeds of each run are pooled into mean ± sample standard
deviation per epoch, one row per run and epoch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections import defaultdict

import numpy as np

COLUMNS = {
  "noisy-dom %": ("decomp_frac_noisy_dom", 100),
  "P(B | noisy-dom) %": ("decomp_p_B_noisy_dom", 100),
  "P(B | clean-dom) %": ("decomp_p_B_clean_dom", 100),
  "amp clean": ("decomp_amp_clean", 1),
  "amp noisy": ("decomp_amp_noisy", 1),
  "noisy weight SAM": ("decomp_noisy_weight_sam", 1),
  "noisy weight SANER": ("decomp_noisy_weight_saner", 1),
  "clean weight SAM": ("decomp_clean_weight_sam", 1),
  "clean weight SANER": ("decomp_clean_weight_saner", 1),
}


def _fmt(value: float | None, scale: float) -> str:
  return "n/a" if value is None else f"{scale * value:.{1 if scale == 100 else 3}f}"


def _fmt_seeds(values: list[float | None], scale: float, digits: int | None = None) -> str:
  """Mean ± sample std over seeds; n/a when any seed could not measure it."""
  if not values or any(v is None for v in values):
    return "n/a"
  array = scale * np.asarray(values, dtype=float)
  digits = digits if digits is not None else 1 if scale == 100 else 3
  spread = f" ± {array.std(ddof=1):.{digits}f}" if array.size > 1 else ""
  return f"{array.mean():.{digits}f}{spread}"


def _load(run: pathlib.Path) -> dict[int, dict] | str:
  history = {r["epoch"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
  if "decomp_frac_noisy_dom" not in history[min(history)]:
    return f"error: {run} was not trained with --log_decomposition true"
  return history


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir", type=pathlib.Path)
  parser.add_argument("--epochs", nargs="+", type=int, default=[1, 5, 10, 15, 20, 30])
  parser.add_argument("--mean", action="store_true", help="pool each run's seeds into mean ± std")
  args = parser.parse_args(argv)
  runs = sorted(p for p in args.out_dir.glob("*_seed*") if (p / "metrics.jsonl").is_file())
  if not runs:
    print(f"error: no <run>_seed<k>/metrics.jsonl under {args.out_dir}; point at a compare --out_dir", file=sys.stderr)
    return 2
  histories: dict[str, list[dict[int, dict]]] = defaultdict(list)
  for run in runs:
    history = _load(run)
    if isinstance(history, str):
      print(history, file=sys.stderr)
      return 2
    name = re.sub(r"_seed\d+$", "", run.name) if args.mean else run.name
    histories[name].append(history)
  label = "run (seeds)" if args.mean else "run"
  print(f"| {label} | epoch | " + " | ".join(COLUMNS) + " |")
  print("|---|---|" + "---|" * len(COLUMNS))
  for name, seeds in histories.items():
    shown = f"{name} ({len(seeds)})" if args.mean else name
    for epoch in (e for e in args.epochs if all(e in h for h in seeds)):
      cells = (_fmt_seeds([h[epoch].get(key) for h in seeds], scale) for key, scale in COLUMNS.values())
      print(f"| {shown} | {epoch} | " + " | ".join(cells) + " |")
  finals = {name: [h[max(h)] for h in seeds] for name, seeds in histories.items()}
  finals = {name: last for name, last in finals.items() if all(r.get("sharpness_lambda_max") is not None for r in last)}
  if finals:
    print(f"\n| {label} | top Hessian eigenvalue (final) | Hessian trace (final) |\n|---|---|---|")
    for name, last in finals.items():
      lam = _fmt_seeds([r["sharpness_lambda_max"] for r in last], 1, digits=2)
      trace = _fmt_seeds([r["sharpness_trace"] for r in last], 1, digits=1)
      shown = f"{name} ({len(last)})" if args.mean else name
      print(f"| {shown} | {lam} | {trace} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
