"""The benchmark script: its ratios are computed from its timings (checked on made-up timings, since timings
themselves do not belong in tests), and each benchmark runs at a tiny size."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench  # noqa: E402


def test_data_path_ratios_are_the_timings_divided(capsys):
    times = [0.002, 0.004, 0.006, 0.001, 0.0005, 0.0021, 0.008, 0.1]  # seconds, in DATA_PATH_SIDES' order
    ratios = bench.data_path_ratios(times)
    expected = dict(reopened_over_ours=2.0, previous_over_ours=3.0, ours_over_copy=2.0, ours_over_memcpy=4.0)
    expected.update(lookup_over_ours=1.05, cpu_lookup_over_ours=4.0, naive_over_ours=50.0)
    assert ratios == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "lookup / ours = 1.05" in printed and "ours / memcpy = 4.00" in printed and "2.00 ms" in printed


def test_bench_data_path_runs_every_side(capsys):
    ratios = bench.bench_data_path(repeats=2, n_cases=2)
    assert set(ratios) == {key for *_, key in bench.DATA_PATH_SIDES if key}
    assert all(r > 0 for r in ratios.values())
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(bench.DATA_PATH_SIDES)


def test_bench_structures_ratios_are_against_paper(capsys):
    ratios = bench.bench_structures(repeats=1, crop=(8, 16, 16))
    assert set(ratios) == {"paper", "all", "all, --seg-chunk 8"} and ratios["paper"] == (1.0, 1.0)
    assert all(t > 0 and m > 0 for t, m in ratios.values())
    assert "peak memory of the model and steps" in capsys.readouterr().out
