"""Test accuracy of the same short run in float32 and in bfloat16 compute.

Trains the main job's setting (``fashion_mnist_quick``: Fashion-MNIST, 40%
symmetric label noise, ResNet-8, SANER) on a subset for a few epochs through
:func:`saner_jax.train.train`, once with ``dtype: float32`` and once with
``dtype: bfloat16``, and prints the test accuracy of both side by side.
Everything else is the same: seed, data, noise, batches, augmentation.

bfloat16 here is mixed precision: the model computes in bfloat16 while the
parameters, BatchNorm statistics, logits and loss stay float32, so the
gradients are float32 and so are SAM's norm and SANER's group masks. On a
CPU bfloat16 brings no speed (XLA emulates much of it); the point is that
accuracy holds, as it must before a bfloat16 run on an accelerator.

Usage::

  python benchmarks/bf16_vs_fp32.py                 # 4,000 images, 6 epochs (about 4 min on 2 cores)
  python benchmarks/bf16_vs_fp32.py --train_examples 512 --epochs 1 --out ""   # smoke run

Writes ``--out``.txt (the table) and ``--out``.json (per-epoch metrics, the
command and the git revision).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

import jax

from saner_jax.train import config as config_lib
from saner_jax.train import reporting
from saner_jax.train.loop import train

DTYPES = ("float32", "bfloat16")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="fashion_mnist_quick")
  parser.add_argument("--train_examples", type=int, default=4000)
  parser.add_argument("--test_examples", type=int, default=2000)
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--alpha_warmup_epochs", type=int, default=2)
  parser.add_argument(
    "--out",
    default=os.path.join(ROOT, "benchmarks", "results", "bf16_vs_fp32"),
    help='results path without suffix; "" writes nothing',
  )
  parser.add_argument("--runs_dir", default=None, help="where the two runs go (default: a temporary folder)")
  args = parser.parse_args(argv)

  base = config_lib.from_mapping(
    {
      "train_examples": args.train_examples,
      "test_examples": args.test_examples,
      "epochs": args.epochs,
      "alpha_warmup_epochs": args.alpha_warmup_epochs,
      "progress": "lines",
      "checkpoint": False,
    },
    config_lib.from_mapping(config_lib.load_yaml(args.config)),
  )
  runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="bf16_vs_fp32_")
  summaries = {}
  for dtype in DTYPES:
    config = config_lib.from_mapping({"dtype": dtype, "out_dir": os.path.join(runs_dir, dtype)}, base)
    summaries[dtype] = train(config)

  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
  histories = {
    d: [json.loads(line) for line in pathlib.Path(runs_dir, d, "metrics.jsonl").read_text().splitlines()]
    for d in DTYPES
  }
  device = jax.devices()[0]
  lines = [
    f"command: {command}",
    f"git: {reporting.git_revision()}",
    f"jax {jax.__version__}, device {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs",
    f"{base.run_name}, {base.model} on {base.dataset}: {args.train_examples} train / {args.test_examples} test "
    f"images, {base.noise_mode} noise {base.noise_rate:.0%}, {args.epochs} epochs, batch {base.batch_size}, seed {base.seed}",
    "",
    f"{'epoch':>5} " + " ".join(f"{f'test {d}':>14}" for d in DTYPES) + f" {'bf16 - fp32':>12}",
  ]
  for i in range(args.epochs):
    accs = [100 * histories[d][i]["test_acc"] for d in DTYPES]
    lines.append(f"{i + 1:>5} " + " ".join(f"{a:13.2f}%" for a in accs) + f" {accs[1] - accs[0]:+11.2f}")
  rows = [
    ("last test", [100 * summaries[d]["last_test_acc"] for d in DTYPES], "%"),
    ("best test", [100 * summaries[d]["best_test_acc"] for d in DTYPES], "%"),
    ("clean fit", [100 * summaries[d]["final"]["clean_acc"] for d in DTYPES], "%"),
    ("noisy mem.", [100 * summaries[d]["final"]["noisy_memorised"] for d in DTYPES], "%"),
    ("wall time", [summaries[d]["final"]["wall_time_s"] for d in DTYPES], "s"),
  ]
  lines += ["", f"{'':<10}" + "".join(f"{d:>14}" for d in DTYPES)]
  lines += [f"{label:<10}" + "".join(f"{v:13.2f}{unit}" for v in values) for label, values, unit in rows]
  text = "\n".join(lines)
  print(text)

  result = {
    "command": command,
    "git": reporting.git_revision(),
    "jax": jax.__version__,
    "device": f"{device.platform} ({device.device_kind})",
    "cpu_count": os.cpu_count(),
    "config": base.to_dict(),
    "runs": {
      d: {
        "last_test_acc": summaries[d]["last_test_acc"],
        "best_test_acc": summaries[d]["best_test_acc"],
        "wall_time_s": summaries[d]["final"]["wall_time_s"],
        "history": histories[d],
      }
      for d in DTYPES
    },
  }
  if args.out:
    reporting.write_results(args.out, result, text)
    print(f"\nwrote {args.out}.txt and {args.out}.json")
  return result


if __name__ == "__main__":
  main()
