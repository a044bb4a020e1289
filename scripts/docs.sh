#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html, warnings as errors.
# Run on its own it sets up the venv first; scripts/test.sh runs it inside its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  SANER_JAX_EXTRAS=train,docs
  . scripts/setup_env.sh
fi
python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs: docs/_build/html/index.html" >&2
