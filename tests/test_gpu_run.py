"""The prepared GPU run (bench/gpu_run.sh) rehearsed on the CPU at tiny sizes: every stage runs and its
results come back packed, so the script cannot rot between device runs."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_run_smoke_rehearsal(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_RUN_SECONDS": "2400"}
    env.pop("REHEARSE_CUDA_ON_CPU", None)
    result = subprocess.run(
        ["bash", "bench/gpu_run.sh", str(tmp_path / "out"), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stages = (tmp_path / "out" / "stages.txt").read_text()
    for stage in ("1_cuda_tests", "2_bench", "3_study"):
        assert f"{stage}: rc 0 " in stages, stages
    assert "2b_masks: rc 0 " in stages or "2b_masks: skipped, TotalSegmentator" in stages
    with tarfile.open(tmp_path / "out" / "gpu_run.tar.gz") as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}

        def read(name):
            return tar.extractfile("./" + name).read().decode()

        assert "passed" in read("1_cuda_tests.txt") and "failed" not in read("1_cuda_tests.txt")
        bench = read("2_bench.txt")  # bench.py --gpu --tiny on the CPU: every model, seg and chunk ratio
        assert bench.count("w/ / plain: step time") == 3 and bench.count("w/ chunk 8 / plain: step time") == 3
        assert "117 classes" in bench and "117, chunk 8" in bench and "data wait" in bench
        assert "CPU rehearsal" in read("environment.txt") and "bf16 on the CPU: " in read("environment.txt")
        assert "s per training step (r3d w/ seg, batch 2, crop (16, 32, 32)" in read("3_study.txt")
        report = read("fissures96/report.txt")
        check = read("fissures96/check_F/check.csv")
    assert "primary endpoint" in report and "learning report" in report and "point_region" in report
    assert "average lobes in each case's lungs" in report and check.splitlines()[1].startswith("F,fissures,")
    expected = ("check_F/check.csv", "seg_s0/seg_report_test.json", "figure3.png", "report.txt")
    assert {f"fissures96/{name}" for name in expected} <= names
    assert not any(n.endswith(".pth") for n in names)  # checkpoints stay behind
