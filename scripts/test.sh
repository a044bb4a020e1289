#!/usr/bin/env bash
# Sets up the environment and runs the test suite; pytest's exit code is ours
# (5, "no tests ran", included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Only some tests read the real data and they skip without it: a failed
# install is a warning here, not a failed run.
bash scripts/ensure_fashion_mnist.sh || echo "warning: Debian's dataset-fashion-mnist could not be installed" >&2
. scripts/setup_env.sh
export JAX_PLATFORMS=cpu
# Everything runs, the paper-scale configs marked slow included (about
# 10 minutes on 2 cores); pass -m "not slow" for a quicker local run.
python -m pytest -n 2 "$@"
