"""The benchmark script runs (its numbers are printed, not asserted: timings do not belong in tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench  # noqa: E402


def test_bench_data_path_runs(capsys):
    ratios = bench.bench_data_path(repeats=2, n_cases=2)
    assert set(ratios) == {
        "ours_over_copy",
        "ours_over_memcpy",
        "previous_over_ours",
        "reopened_over_ours",
        "naive_over_ours",
        "lookup_over_ours",
    }
    assert "ours / memcpy" in capsys.readouterr().out


def test_bench_structures_runs(capsys):
    ratios = bench.bench_structures(repeats=1, crop=(8, 16, 16))
    assert set(ratios) == {"paper", "all", "all, --seg-chunk 8"} and ratios["paper"] == (1.0, 1.0)
    assert "peak memory of the model and steps" in capsys.readouterr().out
