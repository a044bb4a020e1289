#!/usr/bin/env bash
# The tuned comparison at a larger scale: 10,000 training images with random crops and flips,
# ResNet-20, 40 epochs (3,120 steps, against 450 at the small scale), 40% symmetric noise,
# 500 noisy validation examples. SGD, SAM and SANER at the settings validation chose at the small
# scale (benchmarks/results/fashion_mnist/tuned/sym40/tune/*.yaml), fresh seeds 10-14, one seed of
# all three at a time, then the paired statistics. Each run records its time (summary.json's
# final.wall_time_s) for planning the next scale. Finished runs are skipped, interrupted ones
# resumed.
#   bash benchmarks/reproduce_scale.sh [OUT_DIR]      SEEDS="10 11" for fewer
#   EPOCHS=2 SEEDS=10 bash benchmarks/reproduce_scale.sh OUT   times an epoch of each method only
#   RUNS=sgd SEEDS=0 EPOCHS=120 FLAGS="--lr 0.05" bash benchmarks/reproduce_scale.sh OUT
#     a pilot: one method, a tuning seed, other epochs and any flags (a schedule to choose on validation)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tuned=benchmarks/results/fashion_mnist/tuned/sym40/tune
out=${1:-benchmarks/results/fashion_mnist/scale/sym40_resnet20_10k}
for seed in ${SEEDS:-10 11 12 13 14}; do
  for run in ${RUNS:-sgd sam saner}; do
    run_dir="$out/${run}_seed$seed" resume=()
    [ -e "$run_dir/summary.json" ] && continue
    [ -e "$run_dir/config.yaml" ] && resume=(--resume)
    python -m saner_jax.train --config "$tuned/$run.yaml" --train_examples 10000 --augment true \
      --model resnet20 --epochs "${EPOCHS:-40}" --seed "$seed" --progress none --out_dir "$run_dir" \
      ${FLAGS:-} "${resume[@]}"
  done
done
[ -n "${RUNS:-}" ] && exit 0  # a pilot: no pairs to compare
python benchmarks/seed_statistics.py "$out" --pairs sam:saner sgd:sam sgd:saner | tee "$out/statistics.md"
