#!/usr/bin/env bash
# Installs the Debian packages the project uses, those missing, when apt-get
# is available:
#   dataset-fashion-mnist  the real data of the main job, the notebooks and some tests;
#   g++ and libdnnl-dev    to build saner_jax.cpu_conv's oneDNN convolutions (the CPU default).
set -euo pipefail
data_dir=${SANER_JAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
missing=()
[ -e "$data_dir/train-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
cxx=${CXX:-g++}; command -v "${cxx%% *}" >/dev/null || missing+=(g++)
[ -e /usr/include/dnnl.hpp ] || missing+=(libdnnl-dev)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"  # never wait for a password
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
