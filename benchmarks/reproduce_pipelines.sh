#!/usr/bin/env bash
# The noise-robust pipelines on real Fashion-MNIST (issue 10): hard
# bootstrapping, Co-teaching, DivideMix, PLC and Joint Optimization, each
# with SGD, SAM and SANER as its optimizer, 2 seeds, at 40% symmetric noise,
# then at 60%. Sizes are the pipelines/fashion_mnist_<pipeline> presets (the
# quick preset in each pipeline; see their headers and docs/pipelines.md).
# Results: benchmarks/results/pipelines/<noise>/<pipeline>/compare.{md,png}
# and each run's summary.json / metrics.jsonl. A finished run is collected,
# not rerun, and an interrupted one resumes from its last checkpoint, so the
# script continues where it stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_system_packages.sh
. scripts/setup_env.sh
out=${1:-benchmarks/results/pipelines}
pipelines=(bootstrap co_teaching dividemix plc joint_optimization)
for rate in 0.4 0.6; do
  for pipeline in "${pipelines[@]}"; do
    python -m saner_jax.train compare --config "pipelines/fashion_mnist_$pipeline" --progress lines \
      --noise_rate "$rate" --runs sgd sam saner --seeds 0 1 --out_dir "$out/sym${rate#0.}0/$pipeline"
  done
done
