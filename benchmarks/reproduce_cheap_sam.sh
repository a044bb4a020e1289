#!/usr/bin/env bash
# Accuracy against cost of SANER with cheap sharpness-aware steps (docs/guides/cheap_sam.md):
# Fashion-MNIST, the fashion_mnist_quick preset, 40% and 60% symmetric noise, 10 paired seeds.
# Runs go seed by seed, so that an interrupted session leaves complete pairs; a finished run
# is collected, not rerun. The step-time ratios are benchmarks/cheap_sam_cost.py's.
#   bash benchmarks/reproduce_cheap_sam.sh STAGE [OUT_DIR]
# STAGE: runs   SGD, SGD for twice the epochs (SAM's gradient evaluations), SAM, SANER and SANER
#               with every policy at two costs, with and without the mask reuse, seeds 0-9
#        smoke  one epoch of each run name on 256 examples, seed 0: checks the names and flags
#        plot   the figure and the paired table from the finished runs (benchmarks/plot_cheap_sam.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:?give a stage: runs, smoke or plot}
out=${2:-benchmarks/results/fashion_mnist/cheap_sam}
# A 500-example validation set held out of the train split (noisy labels, as a practitioner has)
# selects each run's epoch; the test accuracy reported is that epoch's.
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines --val_examples 500 "$@"; }
policies=()
for policy in every2 every4 p0.5 p0.25 ae0 ae1; do policies+=("saner@$policy" "saner@$policy-reuse"); done
case "$stage" in
  runs)
    for rate in 0.4 0.6; do
      dir="$out/sym${rate#0.}0"
      for seed in $(seq 0 9); do
        run --noise_mode symmetric --noise_rate "$rate" --seeds "$seed" --runs sgd sam saner "${policies[@]}" \
          --out_dir "$dir"
        # The preset's 30 epochs twice over: as many gradient evaluations as SAM's run.
        run --noise_mode symmetric --noise_rate "$rate" --seeds "$seed" --runs sgd --epochs 60 \
          --out_dir "$dir/sgd_2x"
      done
    done ;;
  smoke)
    run --noise_mode symmetric --noise_rate 0.4 --seeds 0 --runs sgd sam saner "${policies[@]}" --epochs 1 \
      --train_examples 256 --test_examples 256 --eval_batch_size 256 --alpha_warmup_epochs 1 --out_dir "$out/smoke" ;;
  plot)
    for rate in 40 60; do
      python benchmarks/plot_cheap_sam.py "$out/sym$rate" --sgd_2x "$out/sym$rate/sgd_2x" \
        --title "Fashion-MNIST, $rate% symmetric noise, ResNet-8, 10 seeds"
    done ;;
  *) echo "error: unknown stage $stage; use runs, smoke or plot" >&2; exit 2 ;;
esac
