#!/usr/bin/env bash
# The main job: SGD vs SAM vs SANER on real Fashion-MNIST with 40% symmetric
# label noise, each at the setting chosen on a 500-example validation set
# (benchmarks/RESULTS.md, first section: SGD lr 0.02; SAM rho 0.1; SANER rho
# 0.1, alpha 0.5), about 5 minutes of training on a 2-core CPU. Installs what
# it needs (the venv, and Debian's dataset-fashion-mnist where apt-get is
# available), then trains and writes runs/main_job/compare.{png,md}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_system_packages.sh
. scripts/setup_env.sh
python -m saner_jax.train compare --config fashion_mnist_quick --val_examples 500 \
  --runs sgd sam saner --set sgd:lr=0.02 --out_dir "${1:-runs/main_job}"
