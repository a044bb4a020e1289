#!/usr/bin/env bash
# CPU reproduction of the paper's Table 4 on real Fashion-MNIST: every SAM
# variant with and without SANER at 40% symmetric noise, seed 0 (the
# comparisons of SGD, SAM and SANER with 10 seeds, at 40% and 60% symmetric
# and 40% asymmetric noise, are `reproduce_mechanism.sh headline` and
# `asymmetric`). Sizes are the fashion_mnist_quick preset (see its header).
# Results: benchmarks/results/fashion_mnist/variants_sym40/compare.{md,png}
# and each run's summary.json / metrics.jsonl; a finished run is collected,
# not rerun, so the script resumes where it stopped.
#   bash benchmarks/reproduce_fashion_mnist.sh [OUT]            the seed-0 table above
#   bash benchmarks/reproduce_fashion_mnist.sh validated [OUT]  the same eight runs with the
#     validation protocol (500 noisy validation examples held out, the test accuracy read at
#     the epoch of best validation accuracy) and fresh seeds 10-14 (SEEDS="..." for others),
#     one seed of all eight at a time, then each variant paired with its SANER form
#     (variants_sym40_val/statistics.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_system_packages.sh
. scripts/setup_env.sh
stage=plain
if [ "${1:-}" = validated ]; then stage=validated; shift; fi
out=${1:-benchmarks/results/fashion_mnist}
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines "$@"; }
variants=(asam asam+saner gsam gsam+saner friendly_sam friendly_sam+saner vasso vasso+saner)
if [ "$stage" = plain ]; then
  run --noise_mode symmetric --noise_rate 0.4 --seeds 0 --out_dir "$out/variants_sym40" --runs "${variants[@]}"
  exit
fi
seeds=(${SEEDS:-10 11 12 13 14})
flags=(--noise_mode symmetric --noise_rate 0.4 --val_examples 500 --cpu_conv true --out_dir "$out/variants_sym40_val")
for seed in "${seeds[@]}"; do run "${flags[@]}" --seeds "$seed" --runs "${variants[@]}"; done
run "${flags[@]}" --seeds "${seeds[@]}" --runs "${variants[@]}"  # collects: the table over every seed
python benchmarks/seed_statistics.py "$out/variants_sym40_val" \
  --pairs asam:asam+saner gsam:gsam+saner friendly_sam:friendly_sam+saner vasso:vasso+saner |
  tee "$out/variants_sym40_val/statistics.md"
