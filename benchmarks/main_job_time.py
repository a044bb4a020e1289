"""Wall time of the README's main job from a fresh clone: the install, then each run's training.

Clones the repository (its committed HEAD) into a temporary folder, times
the set-up (``scripts/ensure_system_packages.sh`` and ``scripts/setup_env.sh``:
the venv and the package with its extras), then ``bash scripts/main_job.sh``
with an empty JAX compilation cache, as a first run on a new machine has.
Each run's training time is read off its files: from its ``config.yaml``
(written when the run starts) to its ``summary.json`` (written when it
ends). Everything else on the machine adds to these times; they are one
run's, not medians.

Usage::

  python benchmarks/main_job_time.py      # writes benchmarks/results/main_job_time.{json,txt}
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

from saner_jax.train import reporting

REPO = pathlib.Path(__file__).resolve().parents[1]

RUNS = ("sgd", "sam", "saner")  # what scripts/main_job.sh compares


def _timed(command: str, cwd: pathlib.Path, env: dict[str, str]) -> float:
  started = time.perf_counter()
  subprocess.run(["bash", "-c", command], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "main_job_time"), help="path prefix")
  args = parser.parse_args(argv)
  command = shlex.join(["python", "benchmarks/main_job_time.py", *(argv if argv is not None else sys.argv[1:])])
  with tempfile.TemporaryDirectory(prefix="main_job_time_") as tmp:
    clone, cache = pathlib.Path(tmp) / "repo", pathlib.Path(tmp) / "jax_cache"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    revision = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.strip()  # what the clone runs: the committed HEAD, whatever this checkout's edits
    # As on a new machine: no active venv or import path of this checkout, an empty compile cache.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "/.venv/" not in p + "/")
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    print("installing into a fresh clone ...", flush=True)
    install_s = _timed("bash scripts/ensure_system_packages.sh && . scripts/setup_env.sh", clone, env)
    print(f"installed in {install_s:.0f} s; running the main job ...", flush=True)
    job_s = _timed("bash scripts/main_job.sh", clone, env)
    runs = {}
    for run in RUNS:
      run_dir = clone / "runs" / "main_job" / f"{run}_seed0"
      summary = json.loads((run_dir / "summary.json").read_text())
      runs[run] = {
        "train_s": (run_dir / "summary.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime,
        "best_test_acc": summary["best_test_acc"],
      }
  training_s = sum(r["train_s"] for r in runs.values())
  lines = [
    f"command: {command}",
    f"git: {revision} (the clone)",
    "",
    f"install (fresh clone: venv, package and extras): {install_s:7.1f} s",
    f"main job (bash scripts/main_job.sh, empty compile cache): {job_s:7.1f} s wall",
    f"  training, from each run's config.yaml to its summary.json: {training_s:.1f} s",
    *(f"    {run:<6} {r['train_s']:6.1f} s  (best test {100 * r['best_test_acc']:.2f}%)" for run, r in runs.items()),
  ]
  text = "\n".join(lines)
  print(text)
  record = {
    "command": command,
    "git": revision,
    "install_s": install_s,
    "main_job_s": job_s,
    "training_s": training_s,
    "runs": runs,
  }
  reporting.write_results(args.out, record, text)
  return record


if __name__ == "__main__":
  main()
