#!/usr/bin/env bash
# Real-data experiments behind the paper's explanation (benchmarks/RESULTS.md, "SANER vs SAM
# with statistics" and the sections after it), on Fashion-MNIST with the fashion_mnist_quick
# preset. Runs go seed by seed, so that an interrupted session leaves complete pairs; a
# finished run is collected, not rerun.
#   bash benchmarks/reproduce_mechanism.sh STAGE [OUT_DIR]
# STAGE: headline   SGD, SAM, SANER, seeds 0-9, 40% then 60% symmetric noise
#        asymmetric the same at 40% asymmetric (class-pair) noise
#        groups     the paper's Figs 2-4: SGD-GrA and SGD-GrB beside SGD and SAM, seeds 0-1, 40% and 60%
#        ablations  alpha, warm-up, rho and SANER on the head only, seeds 0-1, 40%
#        decomposition  SGD, SAM, SANER with the clean/noisy decomposition every epoch and
#                   sharpness at the last, seeds 0-1, 40%
#        bn_stats   SANER with the default BatchNorm statistics (the clean pass's) against the
#                   authors' order (--bn_stats perturbed), seeds 0-4, 40%, 500 validation
#                   examples; the paired table goes to OUT_DIR/bn_stats/seed_statistics.md
#        validated  groups, decomposition and ablations again with the validation protocol
#                   (500 noisy validation examples), fresh seeds 10-14 (SEEDS="..." for
#                   others), 40% symmetric, all at one revision: SGD, SAM, SAM-GrA, SAM-GrB and
#                   SANER with the decomposition logged (the probe draws from its own random
#                   stream, so logging does not move training), then SANER's warm-up and
#                   head-only ablations beside a plain SANER run; tables under OUT_DIR/mechanism_val
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:?give a stage: headline, asymmetric, groups, ablations, decomposition, bn_stats or validated}
out=${2:-benchmarks/results/fashion_mnist}
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines --cpu_conv true "$@"; }
case "$stage" in
  headline)
    for rate in 0.4 0.6; do
      for seed in $(seq 0 9); do
        run --noise_mode symmetric --noise_rate "$rate" --runs sgd sam saner --seeds "$seed" \
          --out_dir "$out/headline/sym${rate#0.}0"
      done
    done ;;
  asymmetric)
    for seed in $(seq 0 9); do
      run --noise_mode asymmetric --noise_rate 0.4 --runs sgd sam saner --seeds "$seed" --out_dir "$out/headline/asym40"
    done ;;
  groups)
    # The SGD and SAM runs beside them are the headline's seeds 0-1.
    for seed in 0 1; do
      run --noise_mode symmetric --noise_rate 0.4 --runs sam+grA sam+grB --seeds "$seed" --out_dir "$out/groups/sym40"
    done
    for seed in 0 1; do
      run --noise_mode symmetric --noise_rate 0.6 --runs sam+grA sam+grB --seeds "$seed" --out_dir "$out/groups/sym60"
    done ;;
  ablations)
    for seed in 0 1; do
      base=(--noise_mode symmetric --noise_rate 0.4 --seeds "$seed")
      for alpha in 0.25 0.75; do run "${base[@]}" --runs saner --alpha "$alpha" --out_dir "$out/ablations/alpha$alpha"; done
      # Warm-up over 0, 25%, 50% and 75% of the 30 epochs (the preset's 5 is the headline).
      for k in 0 8 15 22; do run "${base[@]}" --runs saner --alpha_warmup_epochs "$k" --out_dir "$out/ablations/warmup$k"; done
      for rho in 0.05 0.2; do run "${base[@]}" --runs sam saner --rho "$rho" --out_dir "$out/ablations/rho$rho"; done
      run "${base[@]}" --runs saner_head --out_dir "$out/ablations/head"
    done ;;
  decomposition)
    for seed in 0 1; do
      run --noise_mode symmetric --noise_rate 0.4 --runs sgd sam saner --seeds "$seed" --log_decomposition true \
        --sharpness_every 30 --sharpness_iterations 20 --hutchinson_samples 10 --out_dir "$out/decomposition/sym40"
    done
    python benchmarks/decomposition_table.py "$out/decomposition/sym40" --epochs 1 10 20 30 ;;
  bn_stats)
    # One seed of both settings at a time, so that an interrupted session leaves pairs.
    for seed in $(seq 0 4); do
      for order in clean perturbed; do
        run --noise_mode symmetric --noise_rate 0.4 --val_examples 500 --bn_stats "$order" --runs saner \
          --seeds "$seed" --out_dir "$out/bn_stats/$order"
      done
    done
    python benchmarks/seed_statistics.py clean="$out/bn_stats/clean" perturbed="$out/bn_stats/perturbed" \
      --pairs clean/saner:perturbed/saner | tee "$out/bn_stats/seed_statistics.md" ;;
  validated)
    seeds=(${SEEDS:-10 11 12 13 14})
    base=(--noise_mode symmetric --noise_rate 0.4 --val_examples 500)
    val="$out/mechanism_val"
    for seed in "${seeds[@]}"; do
      run "${base[@]}" --seeds "$seed" --runs sgd sam sam+grA sam+grB saner --log_decomposition true \
        --sharpness_every 30 --sharpness_iterations 20 --hutchinson_samples 10 --out_dir "$val/sym40"
    done
    python benchmarks/seed_statistics.py "$val/sym40" --pairs sgd:sam sam:saner sgd:sam+grA sgd:sam+grB \
      sam+grB:sam sam+grA:sam+grB | tee "$val/sym40/statistics.md"
    python benchmarks/decomposition_table.py "$val/sym40" --epochs 1 10 20 30 --mean | tee "$val/sym40/decomposition.md"
    for seed in "${seeds[@]}"; do
      run "${base[@]}" --seeds "$seed" --runs saner --out_dir "$val/ablations/preset"
      for k in 0 8 15 22; do
        run "${base[@]}" --seeds "$seed" --runs saner --alpha_warmup_epochs "$k" --out_dir "$val/ablations/warmup$k"
      done
      run "${base[@]}" --seeds "$seed" --runs saner_head --out_dir "$val/ablations/head"
    done
    a="$val/ablations"
    # Head-only SANER also against SAM (the group runs' SAM: same seeds, flags and revision).
    python benchmarks/seed_statistics.py preset="$a/preset" warmup0="$a/warmup0" warmup8="$a/warmup8" \
      warmup15="$a/warmup15" warmup22="$a/warmup22" head="$a/head" sym40="$val/sym40" \
      --pairs preset/saner:warmup0/saner preset/saner:warmup8/saner preset/saner:warmup15/saner \
      preset/saner:warmup22/saner preset/saner:head/saner_head sym40/sam:head/saner_head | tee "$a/statistics.md" ;;
  *) echo "error: unknown stage $stage; use headline, asymmetric, groups, ablations, decomposition, bn_stats or validated" >&2
     exit 2 ;;
esac
