#!/usr/bin/env bash
# CPU reproduction of the paper's Table 4 on real Fashion-MNIST: every SAM
# variant with and without SANER at 40% symmetric noise, seed 0 (the
# comparisons of SGD, SAM and SANER with 10 seeds, at 40% and 60% symmetric
# and 40% asymmetric noise, are `reproduce_mechanism.sh headline` and
# `asymmetric`). Sizes are the fashion_mnist_quick preset (see its header).
# Results: benchmarks/results/fashion_mnist/variants_sym40/compare.{md,png}
# and each run's summary.json / metrics.jsonl; a finished run is collected,
# not rerun, so the script resumes where it stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_system_packages.sh
. scripts/setup_env.sh
out=${1:-benchmarks/results/fashion_mnist}
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines "$@"; }
run --noise_mode symmetric --noise_rate 0.4 --seeds 0 --out_dir "$out/variants_sym40" \
  --runs asam asam+saner gsam gsam+saner friendly_sam friendly_sam+saner vasso vasso+saner
