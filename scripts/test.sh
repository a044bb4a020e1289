#!/usr/bin/env bash
# Sets up the environment and runs the test suite; pytest's exit code is ours
# (5, "no tests ran", included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_fashion_mnist.sh
. scripts/setup_env.sh
export JAX_PLATFORMS=cpu
python -m pytest -n 2 "$@"
