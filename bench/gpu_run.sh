#!/usr/bin/env bash
# One prepared GPU run: CUDA tests, the benchmark at the paper's sizes, and the positive-control
# phantom study at the paper's chest geometry (docs/synthetic_study_grid6.md: the fissures phantoms of
# docs/synthetic_study_fissures.md), in that order, within a time budget. Each stage
# writes its log as soon as it ends, a stage that fails or runs out of time does not stop the next, and after
# every stage the results so far are packed into OUTDIR/gpu_run.tar.gz (checkpoints left out).
#
#   bash bench/gpu_run.sh OUTDIR            # on a GPU machine: at most GPU_RUN_SECONDS (480) in all
#   bash bench/gpu_run.sh OUTDIR --smoke    # CPU rehearsal at tiny sizes (tests/test_gpu_run.py)
#
# On a machine with the requirements installed it needs nothing else. On one that has PyTorch but no internet
# (and so no nibabel / pydicom): run `bash bench/gpu_wheels.sh` where there is internet, which downloads their
# wheels into .whl/ (git-ignored); copy the checkout with .whl/ to the GPU machine, and this script installs
# them first.
set -u
out=${1:?usage: bash bench/gpu_run.sh OUTDIR [--smoke]}
smoke=${2:-}
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_RUN_WORK:-$out/work}
mkdir -p "$work"
py=${PYTHON:-python3}
budget=${GPU_RUN_SECONDS:-480}
start=$(date +%s)
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

left() { echo $((budget - ($(date +%s) - start))); }
pack() { tar czf "$out/gpu_run.tar.gz.tmp" --exclude='*.pth' -C "$work" . && mv "$out/gpu_run.tar.gz.tmp" "$out/gpu_run.tar.gz"; }
stage() { # stage NAME CAP COMMAND...: runs with min(CAP, time left) seconds, logs, packs, goes on
  local name=$1 cap=$2 limit t0 rc
  shift 2
  limit=$(left)
  if [ "$cap" -lt "$limit" ]; then limit=$cap; fi
  if [ "$limit" -lt 15 ]; then
    echo "$name: skipped, $(left) s left" | tee -a "$work/stages.txt"
    return
  fi
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$work/$name.txt" 2>&1
  rc=$?
  echo "$name: rc $rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$work/stages.txt"
  pack
}

study() { # the positive control at the paper's chest crop: check, then seeds in order while time lasts
  local geometry=("$@")
  "$py" docs/study/grid4.py "${geometry[@]}" check --level F | sed -u '/predictions_test.csv: /,/^thresholds: /d'
  for seed in ${STUDY_SEEDS:-0 1 2}; do
    for arm in base seg; do
      "$py" docs/study/grid4.py "${geometry[@]}" run --seed "$seed" --arm "$arm" --level F || return
      rm -f "$work"/fissures96/"${arm}_s$seed"/*.pth # scored already; the checkpoints do not travel back
    done
    "$py" docs/study/grid4.py "${geometry[@]}" report > "$work/fissures96_report_s$seed.txt" 2>&1
  done
}

export -f study
export py work
masks_bench() { # make_masks.py's network pass per case with the offline stand-in, where TotalSegmentator is
  if "$py" -c "import totalsegmentator, nnunetv2" 2> /dev/null; then
    stage 2b_masks "$1" "$py" bench/masks.py --cases "$2" --device "$3" "${@:4}"
  else
    echo "2b_masks: skipped, TotalSegmentator / nnunetv2 not installed" | tee -a "$work/stages.txt"
  fi
}

"$py" - > "$work/environment.txt" 2>&1 << 'EOF'
import os, platform, torch
from ctkit import precision
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPU cores: {precision.device_name()}")
print(f"bf16 on the CPU: {precision.bf16_fault('cpu') or 'right (ctkit/precision.py)'}")
print(f"device: {torch.cuda.get_device_name() if cuda else 'none (CPU rehearsal)'}, "
      f"{torch.cuda.device_count()} GPU(s)")
EOF
if [ "$smoke" = "--smoke" ]; then
  export REHEARSE_CUDA_ON_CPU=1 STUDY_SEEDS=0 # the rehearsal: one seed of the study is enough
  stage 1_cuda_tests 600 "$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
  stage 2_bench 600 "$py" bench/bench.py --gpu --tiny --device cpu --repeats 1 --workers 0
  masks_bench 600 1 cpu --shape 122 101 56 # a quarter of each axis: the code path, not the time
  stage 3_study 900 bash -c 'study "$@"' study --crop 16 32 32 --out "$work/fissures96" --smoke
else
  stage 1_cuda_tests 100 "$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
  stage 2_bench 150 "$py" bench/bench.py --gpu --repeats 10 --workers 8
  masks_bench 60 2 gpu
  stage 3_study 600 bash -c 'study "$@"' study --crop 96 192 192 --out "$work/fissures96"
fi
cp "$work/stages.txt" "$out/stages.txt"
echo "done in $(($(date +%s) - start)) s; results in $out/gpu_run.tar.gz"
