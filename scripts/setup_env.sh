#!/usr/bin/env bash
# Creates .venv and installs saner_jax with the extras in $SANER_JAX_EXTRAS
# (default train,test: what the main job and the tests need).
# Sourced by the main-job and test scripts, so a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { echo "error: python3 -m venv failed; on Debian/Ubuntu install python3-venv" >&2; exit 1; }
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[${SANER_JAX_EXTRAS:-train,test}]"
