"""Checks that two run directories logged the same run: every epoch's metrics equal, wall times apart.

A result section may pair runs made at different revisions only where a rerun
at the later revision reproduces an earlier run exactly; this is that check.

  python benchmarks/same_run.py RUN_DIR RERUN_DIR

Prints "same run: N epochs" and exits 0, or prints the first difference as
one line (the earliest epoch; its train loss before the other keys) and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

# Wall-clock fields: they measure the machine, not the run.
TIME_KEYS = ("epoch_time_s", "wall_time_s")


def records(run_dir: pathlib.Path) -> list[dict]:
  """The epochs ``run_dir`` logged, less their wall times; a run that has not finished is refused."""
  if not (run_dir / "summary.json").is_file():
    raise SystemExit(f"error: {run_dir}: no summary.json, so the run has not finished; give a finished run directory")
  path = run_dir / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines()
  except OSError as error:
    raise SystemExit(f"error: {path}: cannot be read ({error.strerror}); give a finished run directory") from None
  try:
    epochs = [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]
  except json.JSONDecodeError as error:
    raise SystemExit(f"error: {path}: line {error.lineno} is not JSON; the run's log is damaged") from None
  if not epochs:
    raise SystemExit(f"error: {path}: no epoch logged; give a finished run directory")
  return epochs


def first_difference(a: list[dict], b: list[dict]) -> str | None:
  if len(a) != len(b):
    return f"{len(a)} epochs against {len(b)}"
  for ra, rb in zip(a, b):
    # The loss first: it moves before any count does.
    for key in sorted(set(ra) | set(rb), key=lambda k: (k != "train_loss", k)):
      if ra.get(key) != rb.get(key):
        return f"epoch {ra.get('epoch')}: {key} is {ra.get(key)!r} against {rb.get(key)!r}"
  return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dir", type=pathlib.Path)
  parser.add_argument("rerun_dir", type=pathlib.Path)
  args = parser.parse_args(argv)
  a, b = records(args.run_dir), records(args.rerun_dir)
  difference = first_difference(a, b)
  if difference is not None:
    print(f"not the same run: {difference} ({args.run_dir} against {args.rerun_dir})")
    return 1
  print(f"same run: {len(a)} epochs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
