"""Writes tests/data/run_0.2.0: a run directory of saner_jax 0.2.0, interrupted after its first epoch.

tests/test_reliability.py resumes it with today's code, so that a run made by
the previous release keeps resuming. Made once, with 0.2.0's code (git
9e050fb, the commit that named the release) in a checkout of its own:

    git worktree add /tmp/saner_jax_0.2.0 9e050fb
    python tests/data/make_release_run.py /tmp/saner_jax_0.2.0

The data are conftest's banded IDX files (``write_banded_idx``), read through
``$SANER_JAX_FASHION_MNIST_DIR``, so that the config names no directory of
this machine. The run (4 epochs) is killed once its first epoch's checkpoint is on disk:
orbax renames a finished checkpoint into place, so one that is there is whole.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import write_banded_idx  # noqa: E402

FLAGS = [
  "--dataset",
  "fashion_mnist",
  "--data_source",
  "idx",
  "--model",
  "resnet8",
  "--epochs",
  "4",
  "--batch_size",
  "32",
  "--train_examples",
  "96",
  "--test_examples",
  "64",
  "--eval_batch_size",
  "32",
  "--noise_mode",
  "symmetric",
  "--noise_rate",
  "0.4",
  "--optimizer",
  "sam",
  "--saner",
  "true",
  "--alpha_warmup_epochs",
  "1",
  "--progress",
  "none",
  "--seed",
  "3",
]


def main(release_checkout: str) -> int:
  out = HERE / "run_0.2.0"
  shutil.rmtree(out, ignore_errors=True)
  with tempfile.TemporaryDirectory() as idx:
    env = {
      **os.environ,
      "SANER_JAX_FASHION_MNIST_DIR": str(write_banded_idx(pathlib.Path(idx))),
      "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-m", "saner_jax.train", *FLAGS, "--out_dir", str(out)]
    process = subprocess.Popen(command, cwd=release_checkout, env=env)
    metrics = out / "metrics.jsonl"
    while process.poll() is None:
      if metrics.is_file() and metrics.read_text().count("\n") >= 1 and (out / "checkpoints" / "1").is_dir():
        process.send_signal(signal.SIGKILL)
        process.wait()
        break
      time.sleep(0.2)
  epochs = metrics.read_text().count("\n")
  print(f"{out}: {epochs} epoch(s) logged, checkpoints {sorted(p.name for p in (out / 'checkpoints').iterdir())}")
  return 0 if epochs == 1 else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
