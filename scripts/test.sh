#!/usr/bin/env bash
# Sets up the environment and runs the test suite; pytest's exit code is ours
# (5, "no tests ran", included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Only some tests read the real data or build the oneDNN kernels, and they
# skip, saying why, without them: a failed install is a warning here.
bash scripts/ensure_system_packages.sh ||
  echo "warning: Debian's dataset-fashion-mnist, g++ or libdnnl-dev could not be installed" >&2
. scripts/setup_env.sh
export JAX_PLATFORMS=cpu
# Everything runs, the paper-scale configs marked slow included (about
# 10 minutes on 2 cores); pass -m "not slow" for a quicker local run.
python -m pytest -n 2 "$@"
