#!/usr/bin/env bash
# The pre-registered comparison of docs/synthetic_study.md, on the calibrated phantom (synthetic.NODULES):
# R3D-18 without and with --seg, seeds 0-2, at N = 320 training phantoms (the main command) and N = 80 (4x the
# epochs: the same number of steps). Then each run's sharpness, and the tables (with it) and Figure 3.
#     bash docs/study/run_study.sh            # about 2 hours on 2 CPU cores; reruns continue where they stopped
set -euo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-6}  # the calibrated budget for N = 320
out=runs/study
for size in 320 80; do
  if [ "$size" = 320 ]; then extra=(--epochs "$EPOCHS"); else extra=(--synthetic-cases 80 80 200 --epochs $((4 * EPOCHS))); fi
  for seed in 0 1 2; do
    for arm in base seg; do
      flag=(); if [ "$arm" = seg ]; then flag=(--seg); fi
      python train.py --model r3d "${flag[@]}" --seed "$seed" "${extra[@]}" --output-dir "$out/n${size}_${arm}_s${seed}" --resume
    done
  done
  python sharpness.py "$out"/n${size}_*_s*/ | tee "$out/sharpness_n${size}.txt"
  python evaluate.py "$out"/n${size}_*_s*/ --figure "docs/figure3_study_n${size}.png" --output "$out/comparison_n${size}"
done
