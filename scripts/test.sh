#!/usr/bin/env bash
# Sets up the environment, then runs lint, format check, types, the docs
# build (warnings as errors), doctests and the test suite. Any failure fails
# the script, and pytest's exit code is ours (5, "no tests ran", included).
# Arguments go to the test-suite pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Only some tests read the real data or build the oneDNN kernels, and they
# skip, saying why, without them: a failed install is a warning here.
bash scripts/ensure_system_packages.sh ||
  echo "warning: Debian's dataset-fashion-mnist, g++ or libdnnl-dev could not be installed" >&2
SANER_JAX_EXTRAS=dev  # the lint, type and docs tools too
. scripts/setup_env.sh
export JAX_PLATFORMS=cpu
step() { echo "== $*" >&2; "$@"; }
step ruff check .
step ruff format --check .
# The types, the docs build and the doctests (the examples in the core's
# docstrings, and the toolkit's registry, run directory and reporting) run
# side by side: mypy and sphinx use one core each. Each one's output is shown
# once all have ended, and any failure fails the script.
side_by_side() {
  local logs pids=() failed=0 i
  logs=$(mktemp -d)
  for i in $(seq 1 $#); do
    bash -c "${!i}" >"$logs/$i" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 1 $#); do
    echo "== ${!i}" >&2
    if wait "${pids[i - 1]}"; then cat "$logs/$i" >&2; else
      cat "$logs/$i" >&2
      echo "== failed: ${!i}" >&2
      failed=1
    fi
  done
  rm -rf "$logs"
  return "$failed"
}
side_by_side mypy "bash scripts/docs.sh" "python -m pytest -q -p no:xdist --doctest-modules \
  saner_jax/{perturbations,saner,two_pass,parallel,policies,diagnostics,analysis}.py \
  saner_jax/train/{registry,run_dir,reporting}.py"
# Everything runs, the cases marked slow included; pass -m "not slow" for
# a quicker local run.
# One worker per core, 2 to 8 as cores and memory allow (scripts/test_workers.py).
step python -m pytest -n "$(python scripts/test_workers.py)" "$@"
