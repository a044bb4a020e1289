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
#        tuned  the reduced run this CPU affords: 40% symmetric noise, the tuned comparison's SANER config
#               (benchmarks/reproduce_tuned.sh) with the policies that cost <= 1.3x SGD (every2, every4,
#               every4 with mask reuse) and the tuned SGD for twice the epochs, its fresh seeds (default
#               10-14; SEEDS="10 11" for fewer), then the paired table and the cost figure; SGD, SAM and
#               full SANER are that comparison's runs, and a rerun of its SANER seed 10 at the checkout's
#               revision must give the identical run (reruns/), or pairing with them would not be sound
#        here   the question made whole on this machine at this revision, for when that rerun differs
#               (another CPU rounds oneDNN's kernels differently): SGD, SAM and SANER at the tuned
#               settings and SANER with each policy in POLICIES (default: every2, every4 with mask reuse,
#               random p 0.5 and adaptive c 0 with and without it; a name may end in -scaleF for
#               --sam_one_pass_scale F), seeds SEEDS (default 10-14), and
#               the tuned SGD for twice the epochs, into OUT_DIR/sym40_<revision>, then the paired
#               table and the cost figure. Run it from a checkout that stays at one revision
#               (a git worktree), since the directory is named after it. SETTING=sym60 (default sym40)
#               runs it at 60% symmetric noise, with that setting's tuned configs, into
#               OUT_DIR/sym60_<revision>; SGD's is the extended lr grid's choice where it moved (tune_sgd_low)
#        scaled SANER's cheap policies with the one-pass steps' gradients at weight F
#               (--sam_one_pass_scale; F is tuned SGD's lr over SANER's), paired with the here stage's
#               runs at 7f53528 (SETTING=sym60: at 04ce4ac), which a rerun must reproduce, seeds 10-14,
#               and at 40% SANER with every 2nd step so weighted for seeds 15-19 too, into
#               OUT_DIR/<setting>_scaled_<revision>, then the paired table and the figure
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:?give a stage: runs, smoke, plot, tuned, here or scaled}
out=${2:-benchmarks/results/fashion_mnist/cheap_sam}
# A 500-example validation set held out of the train split (noisy labels, as a practitioner has)
# selects each run's epoch; the test accuracy reported is that epoch's.
run() { python -m saner_jax.train compare --config fashion_mnist_quick --progress lines --val_examples 500 "$@"; }
policies=()
for policy in every2 every4 p0.5 p0.25 ae0 ae1; do policies+=("saner@$policy" "saner@$policy-reuse"); done
# CONFIG NAME SEED FLAGS...: one run into $dir (set by the stage), resumed if interrupted, skipped if finished.
train() {
  local config=$1 name=$2 seed=$3; shift 3
  local run_dir="$dir/${name}_seed$seed" resume=()
  [ -e "$run_dir/summary.json" ] && return
  [ -e "$run_dir/config.yaml" ] && resume=(--resume)
  python -m saner_jax.train --config "$config" --seed "$seed" --progress none \
    --out_dir "$run_dir" "${resume[@]}" "$@"
}
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
  tuned)
    tuned=benchmarks/results/fashion_mnist/tuned/sym40
    dir="$out/sym40_tuned"
    saner="$tuned/tune/saner.yaml"
    rerun="reruns/saner_$(git rev-parse --short HEAD)"
    train "$saner" "$rerun" 10
    python benchmarks/same_run.py "$tuned/final/saner_seed10" "$dir/${rerun}_seed10" || {
      echo "error: this machine or revision does not rerun the paired SANER run; use the here stage" >&2
      exit 1
    }
    for seed in ${SEEDS:-$(seq 10 14)}; do
      train "$saner" saner@every2 "$seed" --sam_policy every --sam_every 2
      train "$saner" saner@every4 "$seed" --sam_policy every --sam_every 4
      train "$saner" saner@every4-reuse "$seed" --sam_policy every --sam_every 4 --saner_reuse_mask true
      # The tuned SGD for twice the epochs: as many gradient evaluations as SAM's run.
      train "$tuned/tune/sgd.yaml" sgd_2x/sgd "$seed" --epochs 60
    done
    python benchmarks/seed_statistics.py tuned="$tuned/final" cheap="$dir" sgd_2x="$dir/sgd_2x" \
      --pairs tuned/saner:cheap/saner@every2 tuned/saner:cheap/saner@every4 tuned/sgd:cheap/saner@every2 \
      tuned/saner:cheap/saner@every4-reuse tuned/sam:cheap/saner@every2 cheap/saner@every4:cheap/saner@every4-reuse \
      tuned/saner:sgd_2x/sgd tuned/sgd:sgd_2x/sgd | tee "$dir/statistics.md"
    python benchmarks/plot_cheap_sam.py "$tuned/final" "$dir" --exclude saner_rerun --sgd_2x "$dir/sgd_2x" \
      --out "$dir" --title "Fashion-MNIST, 40% symmetric noise, ResNet-8, tuned settings" ;;
  here)
    setting=${SETTING:-sym40}
    case "$setting" in
      sym40) sgd_config=tune/sgd.yaml ;;  # the extended grid kept lr 0.02
      sym60) sgd_config=tune_sgd_low/sgd.yaml ;;  # the extended grid moved SGD to lr 0.01
      *) echo "error: SETTING: $setting has no tuned configs here; use sym40 or sym60" >&2; exit 2 ;;
    esac
    tuned=benchmarks/results/fashion_mnist/tuned/$setting/tune
    sgd_config=benchmarks/results/fashion_mnist/tuned/$setting/$sgd_config
    dir="$out/${setting}_$(git rev-parse --short HEAD)"
    policy_flags() {  # every2, p0.5 or ae0, then an optional -reuse, then an optional -scaleF: the trainer's flags
      local name=${1%-scale*} flags=()
      if ! [[ $1 =~ ^(every[0-9]+|p[0-9.]+|ae[0-9.]+)(-reuse)?(-scale[0-9.]+)?$ ]]; then
        echo "error: POLICIES: $1 is not everyK, pP or aeC (then an optional -reuse, then an optional -scaleF)" >&2
        exit 2
      fi
      if [ "$name" != "$1" ]; then flags+=(--sam_one_pass_scale "${1##*-scale}"); fi
      name=${name%-reuse}
      case "$name" in
        every*) flags+=(--sam_policy every --sam_every "${name#every}") ;;
        p*) flags+=(--sam_policy random --sam_prob "${name#p}") ;;
        ae*) flags+=(--sam_policy adaptive --sam_c "${name#ae}") ;;
      esac
      if [[ $1 == *-reuse* ]]; then flags+=(--saner_reuse_mask true); fi
      echo "${flags[@]}"
    }
    policies=(${POLICIES:-every2 every4-reuse p0.5 p0.5-reuse ae0 ae0-reuse})
    for policy in "${policies[@]}"; do policy_flags "$policy" >/dev/null; done  # a bad name fails before any run
    pairs=(sgd:sam sam:saner sgd:saner)
    for seed in ${SEEDS:-$(seq 10 14)}; do
      for method in saner sam; do train "$tuned/$method.yaml" "$method" "$seed"; done
      train "$sgd_config" sgd "$seed"
      # shellcheck disable=SC2046  # the flags split into words on purpose
      for policy in "${policies[@]}"; do train "$tuned/saner.yaml" "saner@$policy" "$seed" $(policy_flags "$policy"); done
    done
    # SGD for twice the epochs (SAM's gradient evaluations), after the rest: a session that ends early
    # leaves the table's main runs complete.
    for seed in ${SEEDS:-$(seq 10 14)}; do train "$sgd_config" sgd_2x/sgd "$seed" --epochs 60; done
    for policy in "${policies[@]}"; do
      pairs+=("saner:saner@$policy" "sgd:saner@$policy")
      plain=${policy%-reuse}
      if [ "$plain" != "$policy" ] && [[ " ${policies[*]} " == *" $plain "* ]]; then
        pairs+=("saner@$plain:saner@$policy")  # with and without the mask reuse, where both ran
      fi
    done
    python benchmarks/seed_statistics.py "$dir" sgd_2x="$dir/sgd_2x" \
      --pairs $(printf '%s\n' "${pairs[@]}" sgd:sgd_2x/sgd saner:sgd_2x/sgd | sort -u) | tee "$dir/statistics.md"
    python benchmarks/plot_cheap_sam.py "$dir" --sgd_2x "$dir/sgd_2x" --out "$dir" \
      --title "Fashion-MNIST, ${setting#sym}% symmetric noise, ResNet-8, tuned settings, one machine and revision" ;;
  scaled)
    # SANER's cheap policies with the one-pass steps' gradients at weight F = tuned SGD's lr over
    # SANER's, paired with the here stage's runs of the setting on the machine that made them, which a
    # rerun must reproduce bit for bit. sym40: F 0.4 (0.02/0.05), three policies, seeds 10-14, then
    # seeds 15-19 of SANER and every 2nd step; sym60: F 0.2 (0.01/0.05), every 2nd step, seeds 10-14.
    setting=${SETTING:-sym40}
    case "$setting" in
      sym40) here="$out/sym40_7f53528" scale=0.4 ;;
      sym60) here="$out/sym60_04ce4ac" scale=0.2 ;;
      *) echo "error: SETTING: $setting has no here-stage runs to pair with; use sym40 or sym60" >&2; exit 2 ;;
    esac
    tuned=benchmarks/results/fashion_mnist/tuned/$setting/tune
    dir="$out/${setting}_scaled_$(git rev-parse --short HEAD)"
    train "$tuned/saner.yaml" reruns/saner@every2 10 --sam_policy every --sam_every 2
    python benchmarks/same_run.py "$here/saner@every2_seed10" "$dir/reruns/saner@every2_seed10" || {
      echo "error: this machine or revision does not rerun $here; use the here stage with -scaleF policies" >&2
      exit 1
    }
    every2=(--sam_policy every --sam_every 2 --sam_one_pass_scale "$scale")
    pairs=("saner:saner@every2-scale$scale" "saner@every2:saner@every2-scale$scale"
      "sgd:saner@every2-scale$scale" "sam:saner@every2-scale$scale")
    for seed in $(seq 10 14); do
      train "$tuned/saner.yaml" "saner@every2-scale$scale" "$seed" "${every2[@]}"
      if [ "$setting" = sym40 ]; then
        train "$tuned/saner.yaml" "saner@ae0-reuse-scale$scale" "$seed" --sam_policy adaptive --sam_c 0 \
          --saner_reuse_mask true --sam_one_pass_scale "$scale"
        train "$tuned/saner.yaml" "saner@every2-reuse-scale$scale" "$seed" "${every2[@]}" --saner_reuse_mask true
      fi
    done
    if [ "$setting" = sym40 ]; then
      # In a folder of their own: the figure is of seeds 10-14, one directory per run name.
      for seed in $(seq 15 19); do
        train "$tuned/saner.yaml" "seeds15_19/saner@every2-scale$scale" "$seed" "${every2[@]}"
        train "$tuned/saner.yaml" seeds15_19/saner "$seed"
      done
      pairs+=("saner:saner@every2-reuse-scale$scale" "saner:saner@ae0-reuse-scale$scale"
        "saner@ae0-reuse:saner@ae0-reuse-scale$scale" "saner@every2-scale$scale:saner@every2-reuse-scale$scale")
    fi
    extra=()
    [ "$setting" = sym40 ] && extra=("$dir/seeds15_19")
    python benchmarks/seed_statistics.py "$here" "$dir" "${extra[@]}" --pairs "${pairs[@]}" | tee "$dir/statistics.md"
    python benchmarks/plot_cheap_sam.py "$here" "$dir" --out "$dir" \
      --title "Fashion-MNIST, ${setting#sym}% symmetric noise, ResNet-8: one-pass steps at weight $scale" ;;
  plot)
    for rate in 40 60; do
      python benchmarks/plot_cheap_sam.py "$out/sym$rate" --sgd_2x "$out/sym$rate/sgd_2x" \
        --title "Fashion-MNIST, $rate% symmetric noise, ResNet-8, 10 seeds"
    done ;;
  *) echo "error: unknown stage $stage; use runs, smoke, plot, tuned, here or scaled" >&2; exit 2 ;;
esac
