#!/usr/bin/env bash
# Wheels of what bench/gpu_run.sh needs and the device machine lacks (Python 3.12 there): nibabel, pydicom.
# Into .whl/ (git-ignored via .git/info/exclude); the device run carries .whl and gpu_run.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "nibabel==5.3.2" "pydicom==3.0.1"
ls -l .whl
