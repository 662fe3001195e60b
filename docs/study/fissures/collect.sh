#!/usr/bin/env bash
# Copy the raw outputs of the positive control's finished runs (docs/synthetic_study_fissures.md §2) from the
# study's worktree into this folder; checkpoints stay behind. Rerun after each run: finished runs are copied
# again (same bytes), unfinished ones (no localisation_cases.csv yet) are skipped.
#   bash docs/study/fissures/collect.sh [runs/fissures64 of the worktree]
set -eu
src=${1:-/work/fissures64/runs/fissures64}
dst=$(dirname "$0")
for run in "$src"/{base,seg}_s*; do
  test -f "$run/localisation_cases.csv" || continue
  name=$(basename "$run")
  files=(config.json iterations.csv epochs.csv localisation_cases.csv
         predictions_{val,test}.csv metrics_{val,test}.{csv,json})
  [[ $name == seg_* ]] && files+=({seg_report,dice}_{val,test}.json)
  mkdir -p "$dst/$name"
  for f in "${files[@]}"; do
    cp "$run/$f" "$dst/$name/" || { echo "$run: $f missing: the run has not finished writing"; exit 1; }
  done
  echo "$name: ${#files[@]} files"
done
for f in report.txt report.json comparison.txt comparison.json figure3.png "$src"/report_s*.txt; do
  f=$src/$(basename "$f")
  if test -f "$f"; then cp "$f" "$dst/"; fi
done
