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
  update relative to SGD's (1 by definition);

and, last, the final epoch's Hessian top eigenvalue and trace where logged.

    python benchmarks/decomposition_table.py benchmarks/results/fashion_mnist/decomposition/sym40 \
        --epochs 1 5 10 15 20 30
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

COLUMNS = {
  "noisy-dom %": ("decomp_frac_noisy_dom", 100),
  "P(B | noisy-dom) %": ("decomp_p_B_noisy_dom", 100),
  "P(B | clean-dom) %": ("decomp_p_B_clean_dom", 100),
  "amp clean": ("decomp_amp_clean", 1),
  "amp noisy": ("decomp_amp_noisy", 1),
  "noisy weight SAM": ("decomp_noisy_weight_sam", 1),
  "noisy weight SANER": ("decomp_noisy_weight_saner", 1),
}


def _fmt(value: float | None, scale: float) -> str:
  return "n/a" if value is None else f"{scale * value:.{1 if scale == 100 else 3}f}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir", type=pathlib.Path)
  parser.add_argument("--epochs", nargs="+", type=int, default=[1, 5, 10, 15, 20, 30])
  args = parser.parse_args(argv)
  runs = sorted(p for p in args.out_dir.glob("*_seed*") if (p / "metrics.jsonl").is_file())
  if not runs:
    print(f"error: no <run>_seed<k>/metrics.jsonl under {args.out_dir}; point at a compare --out_dir", file=sys.stderr)
    return 2
  print("| run | epoch | " + " | ".join(COLUMNS) + " |")
  print("|---|---|" + "---|" * len(COLUMNS))
  sharpness = []
  for run in runs:
    history = {r["epoch"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    if "decomp_frac_noisy_dom" not in history[min(history)]:
      print(f"error: {run} was not trained with --log_decomposition true", file=sys.stderr)
      return 2
    for epoch in (e for e in args.epochs if e in history):
      cells = (_fmt(history[epoch][key], scale) for key, scale in COLUMNS.values())
      print(f"| {run.name} | {epoch} | " + " | ".join(cells) + " |")
    last = history[max(history)]
    if last.get("sharpness_lambda_max") is not None:
      sharpness.append((run.name, last["sharpness_lambda_max"], last["sharpness_trace"]))
  if sharpness:
    print("\n| run | top Hessian eigenvalue (final) | Hessian trace (final) |\n|---|---|---|")
    for name, lam, trace in sharpness:
      print(f"| {name} | {lam:.2f} | {trace:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
