#!/usr/bin/env bash
# The main job: SGD vs SAM vs SANER on real Fashion-MNIST with 40% symmetric
# label noise, sized to finish within 15 minutes on a 2-core CPU. Installs
# what it needs (the venv, and Debian's dataset-fashion-mnist where apt-get
# is available), then trains and writes runs/main_job/compare.{png,md}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data_dir=${SANER_JAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -e "$data_dir/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
. scripts/setup_env.sh
python -m saner_jax.train compare --config fashion_mnist_quick --runs sgd sam saner \
  --out_dir "${1:-runs/main_job}"
