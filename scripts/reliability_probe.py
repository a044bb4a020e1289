"""Drives the training CLI as a user would, through the failure cases of docs/reliability.md.

Each case runs ``python -m saner_jax.train`` in a subprocess and checks its
exit status and its last line; the script prints one line per case that does
not hold, then "N cases, N hold" (exit 1 unless all hold). It trains one tiny
run (the smoke-test ResNet-4, 96 images, 2 epochs) on a synthetic IDX dataset it writes,
and reuses it for the resume and compare cases.

  python scripts/reliability_probe.py [--work_dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

TINY = [
  "--optimizer=sgd",
  "--cpu_conv=false",
  "--lr_schedule=constant",
  "--model=resnet4",
  "--epochs=2",
  "--batch_size=32",
  "--train_examples=96",
  "--test_examples=64",
  "--eval_batch_size=32",
  "--progress=lines",
]


def write_data(directory: pathlib.Path) -> None:
  """Fashion-MNIST-shaped IDX files: the class sets a bright band."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 128), ("t10k", 64)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c : 2 * c + 3] = 250
    with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.tobytes())
    with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBI", 0, 0x08, 1, n) + labels.astype(np.uint8).tobytes())


class Probe:
  def __init__(self, work: pathlib.Path):
    self.work, self.data = work, work / "data"
    self.env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    self.cases = self.held = 0

  def start(self, *args: str, cwd: pathlib.Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
      [sys.executable, "-m", "saner_jax.train", *args],
      cwd=cwd or self.work,
      env=self.env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

  def check(self, name: str, proc: subprocess.Popen, code: int, last_line: str, also: str = "") -> None:
    """Holds when ``proc`` exits ``code`` with no traceback, its last line matches ``last_line`` and
    its output contains ``also``."""
    output, _ = proc.communicate(timeout=600)
    lines = output.strip().splitlines() or [""]
    bad = [
      why
      for why, failed in (
        (f"exit {proc.returncode}, not {code}", proc.returncode != code),
        ("a traceback", "Traceback" in output or "Exception ignored" in output),
        (f"last line {lines[-1]!r}", not re.fullmatch(last_line, lines[-1])),
        (f"no {also!r}", also not in output),
      )
      if failed
    ]
    self.cases += 1
    self.held += not bad
    if bad:
      print(f"does not hold: {name}: {'; '.join(bad)}", flush=True)

  def train(self, out_dir: pathlib.Path, *extra: str) -> subprocess.Popen:
    return self.start(*TINY, f"--data_dir={self.data}", f"--out_dir={out_dir}", *extra)

  def run_all(self) -> None:
    write_data(self.data)
    runs = self.work / "runs"
    bad_flag = r"error: --{}: .*"
    self.check("a negative exponent is a value", self.train(runs / "x", "--weight_decay", "-1e-4"), 2,
               bad_flag.format("weight_decay"))  # fmt: skip
    self.check("an empty --out_dir", self.train(pathlib.Path(""), "--out_dir="), 2, bad_flag.format("out_dir"))
    self.check("a 300-byte name", self.train(runs / ("n" * 300)), 2, bad_flag.format("out_dir"))
    self.check("a 4 KB --out_dir", self.train(runs.joinpath(*["d" * 200] * 20)), 2, bad_flag.format("out_dir"))
    self.check("a warm-up over the whole run", self.train(runs / "x", "--pipeline=dividemix"), 2,
               bad_flag.format("pipeline_warmup_epochs"))  # fmt: skip

    # One real run, in a comparison's layout, then what a user does to it.
    run = runs / "cmp" / "sgd_seed0"
    self.check("a tiny run", self.train(run), 0, r"epoch +2/2 .*")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.1\n", "lr: 0.05\n"))
    self.check("resume trusts the checkpoint, not an edited config.yaml", self.start("--config", str(config), "--resume"),
               2, r"error: --resume: .* \(as its checkpoint records\); differing keys: lr \(0\.1 -> 0\.05\).*")  # fmt: skip
    config.write_text(config.read_text().replace("lr: 0.05\n", "lr: 0.1\n"))
    compare = ["compare", "--runs", "sgd", "--out_dir", str(runs / "cmp"), *TINY[1:], f"--data_dir={self.data}"]
    self.check("compare refuses a run made under other settings", self.start(*compare, "--lr=0.05"), 2,
               r"error: compare: .* holds a run made with other settings .*: lr \(0\.1 -> 0\.05\);.*")  # fmt: skip
    self.check("compare collects a matching run once per seed", self.start(*compare, "--collect_only", "--seeds", "0", "0"),
               0, r"table: .*compare\.md")  # fmt: skip
    self.check("compare names the run, not --optimizer", self.start(*compare[:3], "adam", *compare[3:]), 2,
               r"error: --runs: 'adam': .*")  # fmt: skip

    # Moved, with its last checkpoint gone: it resumes where it is, from another working directory.
    moved = runs / "moved dir"
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "checkpoints" / "2")
    (moved / "summary.json").unlink()
    elsewhere = self.work / "elsewhere"
    elsewhere.mkdir()
    self.check("a moved run resumes where it is", self.start("--config", str(moved / "config.yaml"), "--resume",
               cwd=elsewhere), 0, r"epoch +2/2 .*", also=f"resumed {moved} after epoch 1")  # fmt: skip
    self.cases += 1
    self.held += not list(elsewhere.iterdir())
    if list(elsewhere.iterdir()):
      print("does not hold: a moved run never re-creates a directory elsewhere", flush=True)

    summary = run / "summary.json"
    summary.write_text(summary.read_text()[:50])
    self.check("a truncated summary.json in compare", self.start(*compare), 2,
               r"error: compare: cannot read .*summary\.json: JSONDecodeError: .*")  # fmt: skip

    # Signals: in the first second, and while the first epoch compiles.
    for signum, when, message in (
      (signal.SIGINT, 0.3, r"error: interrupted before training began; nothing was trained"),
      (signal.SIGTERM, "convolutions:", r"error: terminated by SIGTERM in epoch 1; .*"),
    ):
      proc = self.train(runs / f"signal{signum}", "--epochs=50")
      if isinstance(when, float):
        time.sleep(when)
      else:
        assert proc.stdout is not None
        for line in proc.stdout:
          if when in line:
            break
      proc.send_signal(signum)
      self.check(f"{signal.Signals(signum).name} at {when}", proc, 128 + signum, message)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", help="where to write (default: a temporary directory, removed after)")
  args = parser.parse_args()
  work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="reliability_probe"))
  try:
    probe = Probe(work.absolute())
    probe.run_all()
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)
  print(f"{probe.cases} cases, {probe.held} hold", flush=True)
  return 0 if probe.cases == probe.held else 1


if __name__ == "__main__":
  sys.exit(main())
