#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the real data the main job, the
# notebooks and some tests read) when it is missing and apt-get is available.
set -euo pipefail
data_dir=${SANER_JAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -e "$data_dir/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"  # never wait for a password
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
