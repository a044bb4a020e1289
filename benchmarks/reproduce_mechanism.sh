#!/usr/bin/env bash
# Real-data experiments behind the paper's explanation (docs: benchmarks/RESULTS.md,
# "SANER vs SAM with statistics" and the sections after it), on Fashion-MNIST with the
# fashion_mnist_quick preset and oneDNN convolutions. Runs go seed by seed, so that an
# interrupted session leaves complete pairs; a finished run is collected, not rerun.
#   bash benchmarks/reproduce_mechanism.sh [OUT_DIR] [FIRST_SEED] [LAST_SEED]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-benchmarks/results/fashion_mnist/headline}
first=${2:-0}
last=${3:-9}
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines --cpu_conv true "$@"; }
for seed in $(seq "$first" "$last"); do
  run --noise_mode symmetric --noise_rate 0.4 --runs sgd sam saner --seeds "$seed" --out_dir "$out/sym40"
done
for seed in $(seq "$first" "$last"); do
  run --noise_mode symmetric --noise_rate 0.6 --runs sgd sam saner --seeds "$seed" --out_dir "$out/sym60"
done
