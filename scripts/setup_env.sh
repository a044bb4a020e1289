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
target=".[${SANER_JAX_EXTRAS:-train,test}]"
# uv resolves the same versions as pip (checked on the dev extra: the same
# 186 pins) and installs them in parallel: 17 s from an empty cache here,
# against pip's 49 s with a full one. Compiled to bytecode at install, as
# pip does: where PYTHONDONTWRITEBYTECODE is set, as on this project's CI
# machines, every test process would otherwise parse jax, flax and TFDS
# from source (5.3 s to import them, against 2.4 s). uv reads PyPI, not
# pip.conf's mirrors or constraints (none of which this project's extras
# need). pip stays the fallback where uv cannot be had or fails.
if ! { python -m pip install -q uv && python -m uv pip install -q --compile-bytecode -e "$target"; }; then
  echo "warning: uv could not install $target; falling back to pip" >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q -e "$target"
fi
