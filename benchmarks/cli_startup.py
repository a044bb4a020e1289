"""Start-up time of the command line: ``python -m saner_jax.train --help`` and reading a config.

Each contender is a fresh Python process, timed from its start to its exit,
the contenders interleaved in rotated order over ``--rounds`` rounds so that
load from other processes falls on all of them alike; medians are reported
with the 1-minute load average. Each also reports which of jax, flax and
orbax it loaded. The floor is ``import jax``: the config imports the core
(``saner_jax.parallel``, ``saner_jax.cpu_conv``), which needs jax, so
``--help`` cannot start faster than jax imports until the config stops
needing it. ``import saner_jax.train.loop`` is what the package's eager
import loaded before it became lazy (flax, orbax and the whole engine).

Usage::

  python benchmarks/cli_startup.py     # writes benchmarks/results/cli_startup.{json,txt}
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
  sys.path.insert(0, ROOT)

from saner_jax.train import reporting

_REPORT = (
  "import sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'orbax'}), file=sys.stderr)"
)
CONTENDERS = {
  "python -c pass": ["-c", "pass"],
  "import jax": ["-c", f"import jax; {_REPORT}"],
  "import saner_jax.train.config": ["-c", f"import saner_jax.train.config; {_REPORT}"],
  "python -m saner_jax.train --help": [
    "-c",
    "import atexit, sys; sys.argv = ['saner_jax.train', '--help']\n"
    f"atexit.register(lambda: exec({_REPORT!r}))\n"
    "import runpy; runpy.run_module('saner_jax.train', run_name='__main__')",
  ],
  "import saner_jax.train.loop": ["-c", f"import saner_jax.train.loop; {_REPORT}"],
}


def _run(args: list[str]) -> tuple[float, str]:
  """Wall seconds of one fresh process, and the packages it says it loaded."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=True)
  elapsed = time.perf_counter() - start
  loaded = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "[]"
  return elapsed, loaded


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument(
    "--out",
    default=os.path.join(ROOT, "benchmarks", "results", "cli_startup"),
    help="path prefix of the .txt and .json results; '' writes nothing",
  )
  args = parser.parse_args(argv)
  names = list(CONTENDERS)
  for name in names:  # one untimed run each: the file cache, not the code, makes the first slower
    _run(CONTENDERS[name])
  times: dict[str, list[float]] = {name: [] for name in names}
  loaded: dict[str, str] = {}
  loads = []
  for round_ in range(args.rounds):
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      seconds, loaded[name] = _run(CONTENDERS[name])
      times[name].append(seconds)
    loads.append(os.getloadavg()[0])

  printed = io.StringIO()

  def say(line: str = "") -> None:
    print(line, flush=True)
    printed.write(line + "\n")

  command = shlex.join(["python", "benchmarks/cli_startup.py", *(sys.argv[1:] if argv is None else argv)])
  revision = reporting.git_revision()
  say(f"command: {command}")
  say(f"git: {revision}")
  say(f"{os.cpu_count()} cores; 1-minute load average {min(loads):.1f}-{max(loads):.1f} over the rounds")
  say()
  say(f"{'fresh process':<36} {'median s':>9} {'min s':>7} {'max s':>7}  loads")
  median = {}
  for name in names:
    median[name] = statistics.median(times[name])
    say(
      f"{name:<36} {median[name]:9.2f} {min(times[name]):7.2f} {max(times[name]):7.2f}  "
      f"{loaded.get(name, '[]') if name != 'python -c pass' else ''}"
    )
  result = {
    "command": command,
    "git": revision,
    "rounds": args.rounds,
    "median_s": median,
    "times_s": times,
    "loaded": loaded,
    "load_average_1min": loads,
  }
  if args.out:
    reporting.write_results(args.out, result, printed.getvalue())
    print(f"\nwrote {args.out}.txt and {args.out}.json")
  return result


if __name__ == "__main__":
  main()
