"""The GPU check: SAM against SANER on all of Fashion-MNIST with ResNet-18, timed, inside a fixed budget.

Fashion-MNIST's whole train split (59,500 images to train on, 500 noisy ones
held out to select the epoch), random crops and flips, ResNet-18, 40%
symmetric noise, seed 10, with SAM and SANER at the settings validation
chose at the small scale (``benchmarks/results/fashion_mnist/tuned/sym40/tune/``:
rho 0.1, lr 0.05, SANER's alpha 0.5). It first trains SANER for one epoch,
compilation included, and from that time sets the epochs both methods get so
that everything ends inside ``--budget_s``; then it trains SAM and SANER for
that many epochs (the lr drops at half and three quarters of them, as in the
tuned configs) and writes ``OUT.md`` (the table) and ``OUT.json`` (every
epoch's record and each run's summary, rewritten as each run ends). Each run
compiles from scratch, the persistent compilation cache off, so that epoch 1
times the same work for both.

Its epoch times include the evaluation of the test and validation sets, so
"images/s" (training images over the median epoch time after the first) is
an end-to-end rate, below the step-only one of ``gpu_throughput.py``.

The device machine has no TFDS and no network: carry the four IDX files
(Debian's ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist)::

  mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
  python benchmarks/gpu_check.py --data_dir .data/fashion-mnist --out "$OUT/gpu_check"   # carry .data
  python benchmarks/gpu_check.py --data_dir /usr/share/datasets/fashion-mnist --out /tmp/check \\
      --model resnet8 --train_examples 512 --test_examples 512 --budget_s 120                  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUNED = ROOT / "benchmarks" / "results" / "fashion_mnist" / "tuned" / "sym40" / "tune"
METHODS = ("sam", "saner")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="the folder of Fashion-MNIST's four IDX .gz files")
  parser.add_argument("--out", required=True, help="writes OUT.md and OUT.json; the runs go to OUT_runs/")
  parser.add_argument("--budget_s", type=float, default=480.0, help="seconds for everything (default 480)")
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--train_examples", type=int, default=59500, help="train on this many (default 59,500)")
  parser.add_argument("--val_examples", type=int, default=500, help="held out to select the epoch (>= 1)")
  parser.add_argument("--test_examples", type=int, default=10000)
  parser.add_argument("--seed", type=int, default=10)
  return parser


class RunFailed(Exception):
  """A trainer run ended with an error, which it printed."""


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _train(args: argparse.Namespace, method: str, epochs: int, out_dir: pathlib.Path) -> list[dict]:
  """One run of the trainer in a subprocess; returns its metrics.jsonl records."""
  command = [
    sys.executable, "-m", "saner_jax.train", "--config", str(TUNED / f"{method}.yaml"),
    "--data_dir", args.data_dir, "--model", args.model, "--augment", "true",
    "--train_examples", str(args.train_examples), "--val_examples", str(args.val_examples),
    "--test_examples", str(args.test_examples), "--epochs", str(epochs), "--seed", str(args.seed),
    "--checkpoint", "false", "--compilation_cache", "false", "--progress", "lines", "--out_dir", str(out_dir),
  ]  # fmt: skip
  print("$", shlex.join(command), flush=True)
  if subprocess.run(command, cwd=ROOT).returncode != 0:
    raise RunFailed(f"the {method} run into {out_dir} failed (its error is above)")
  return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def epochs_within(budget_s: float, spent_s: float, epoch_s: float, runs: int = len(METHODS)) -> int:
  """The epochs each of ``runs`` runs can take in what is left of the budget, at least 1.

  ``epoch_s`` is the timing epoch's time, compilation included, so the
  estimate errs short; 15% of it is kept for each run's start-up.
  """
  return max(1, int((budget_s - spent_s) / runs / (epoch_s * 1.15)))


def report(runs: dict[str, dict], train_examples: int, device: str, seed: int = 10) -> str:
  """The markdown table: per method, epoch times, images/s and the validation-selected result."""
  lines = [
    f"GPU check on {device}: Fashion-MNIST, {train_examples} training images with crop and flip, "
    f"40% symmetric noise, seed {seed}, the tuned settings. Epoch times include evaluating the test and "
    "validation sets; each run compiles from scratch (no persistent cache).",
    "",
    "| method | epochs | epoch 1 s (with compilation) | median epoch s (after the first) | images/s "
    "| test % @ best val | last test % | memorised % @ best val |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for method, run in runs.items():
    times = [r["epoch_time_s"] for r in run["metrics"]]
    later = statistics.median(times[1:]) if len(times) > 1 else None
    summary = run["summary"]
    rate = f"{train_examples / later:,.0f}" if later else "-"
    memorised = summary.get("noisy_memorised_at_best_val")
    lines.append(
      f"| {method} | {len(times)} | {times[0]:.1f} | {f'{later:.2f}' if later else '-'} | {rate} "
      f"| {100 * summary['test_acc_at_best_val']:.2f} | {100 * summary['last_test_acc']:.2f} "
      f"| {'-' if memorised is None else f'{100 * memorised:.2f}'} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  data = pathlib.Path(args.data_dir)
  if args.val_examples < 1:
    return _fail(f"--val_examples: must be >= 1 (it selects the reported epoch), got {args.val_examples}")
  if not (data / "train-images-idx3-ubyte.gz").is_file():
    return _fail(f"--data_dir: {data} holds no train-images-idx3-ubyte.gz; give the folder of the four IDX files")
  out = pathlib.Path(args.out)
  work, json_path, md_path = (out.with_name(out.name + suffix) for suffix in ("_runs", ".json", ".md"))
  if work.exists():
    return _fail(f"--out: {work} exists; give another --out (nothing is resumed here)")
  started = time.perf_counter()
  out.parent.mkdir(parents=True, exist_ok=True)
  command = "python benchmarks/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
  record: dict = {"command": command, "runs": {}}

  def save() -> None:  # after every run: a command cut short at its limit still returns what finished
    record["total_s"] = time.perf_counter() - started
    json_path.write_text(json.dumps(record, indent=1) + "\n")

  try:
    timing = _train(args, "saner", 1, work / "timing_saner")
    record["timing_epoch"] = timing[0]
    record["epochs"] = epochs = epochs_within(args.budget_s, time.perf_counter() - started, timing[0]["epoch_time_s"])
    save()
    print(f"one epoch of SANER took {timing[0]['epoch_time_s']:.1f} s with compilation: {epochs} epochs each")
    for method in METHODS:
      run_dir = work / method
      metrics = _train(args, method, epochs, run_dir)
      record["runs"][method] = {"metrics": metrics, "summary": json.loads((run_dir / "summary.json").read_text())}
      save()
  except RunFailed as e:
    return _fail(str(e))
  import jax  # after the runs: this process holds no device while they train

  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s) visible)"
  table = report(record["runs"], args.train_examples, device, args.seed)
  save()
  md_path.write_text(f"{table}\nTotal {record['total_s']:.0f} s. Command: `{command}`\n")
  print(table, flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  sys.exit(main())
