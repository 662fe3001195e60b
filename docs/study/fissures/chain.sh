#!/usr/bin/env bash
# The positive control's runs (docs/synthetic_study_fissures.md §2), resumable: rerun it after any stop.
#   cd /work/fissures64 && STUDY_COMMIT=b3e3eb5 setsid nohup bash /work/main/docs/study/fissures/chain.sh \
#       >> runs/fissures64/chain.log 2>&1 &          # /work/fissures64: a worktree of this repository
# A restart is this same command. Waits for the check (started from commit 6ad9f3f), moves the worktree to
# the study's commit, applies the check's rule, then runs the protocol's order; every grid4.py command skips
# what has finished and resumes what has a checkpoint.
set -u
cd /work/fissures64
py=/work/main/.venv/bin/python
out=runs/fissures64
while pgrep -f "grid4.py --out runs/fissures64 check" > /dev/null; do sleep 30; done
# what a kill leaves: temporary files of atomic writes, and a run whose test outputs stopped half-way (the
# pinned code takes predictions_test.csv, its first test output, for "finished"; metrics_test.json is the last)
find $out -name '.*tmp*' -delete
for run in $out/*/; do
  if [ -f "$run/predictions_test.csv" ] && [ ! -f "$run/metrics_test.json" ]; then rm "$run/predictions_test.csv"; fi
done
git checkout -q --detach "${STUDY_COMMIT:?}"
echo "study code: $(git log --oneline -1)"
level=F
if ! $py - "$out/check_F/check.csv" << 'PY'
import csv, sys
row = next(csv.DictReader(open(sys.argv[1])))
sys.exit(0 if all(float(row[c]) >= 0.60 for c in ("nodule_right_upper_lobe", "nodule_left_lower_lobe")) else 1)
PY
then  # the protocol's rule: a nodule class below 0.60 -> the check at F12, and the study at F12
  # the pinned code reruns a finished check's last evaluation (10 minutes); its check.csv says it is done
  [ -f $out/check_F12/check.csv ] || $py docs/study/grid4.py --out $out check --level F12 2>&1 | sed -u '/predictions_test.csv: /,/^thresholds: /d'
  level=F12
fi
echo "study level: $level"
for seed in 0 1 2; do
  for arm in base seg; do
    $py docs/study/grid4.py --out $out run --seed $seed --arm $arm --level $level || exit 1
  done
  # once, when seed's runs have just finished (a restart passes finished seeds again); atomic against a kill
  [ -f $out/report_s$seed.txt ] || { $py docs/study/grid4.py --out $out report > $out/.report_s$seed.tmp 2>&1 &&
    mv $out/.report_s$seed.tmp $out/report_s$seed.txt; }
done
