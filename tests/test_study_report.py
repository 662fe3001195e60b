"""The study report's primary endpoint (docs/study/grid4.py endpoint_table): per-class Δ AUC, its bootstraps
and the seed-level interval, on hand-made predictions with known AUCs."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "study"))
import grid4  # noqa: E402

from ctkit import synthetic  # noqa: E402
from ctkit.labels import SYNTHETIC_CLASSES, write_predictions  # noqa: E402


def write_run(folder, y, scores):
    folder.mkdir(parents=True)
    ids = [f"synthetic_test_{i:04d}" for i in range(len(y))]
    write_predictions(str(folder / "predictions_test.csv"), ids, y, scores, SYNTHETIC_CLASSES)


def test_endpoint_table_on_known_aucs(tmp_path, monkeypatch):
    """Two positives, two negatives per class: a perfect ranking has AUC 1, one swapped pair 0.75, two 0.5.
    The seg arm ranks NOD-RUL perfectly in both seeds, the base arm at 0.75 and 0.5: Δ_s = +0.25, +0.5."""
    monkeypatch.setattr(grid4, "OUT", tmp_path)
    y = np.tile(np.array([[1], [1], [0], [0]], np.float32), (1, 5))
    perfect, one_swap, two_swaps = [0.9, 0.8, 0.2, 0.1], [0.9, 0.3, 0.4, 0.1], [0.3, 0.2, 0.4, 0.1]
    for seed, base_scores in ((0, one_swap), (1, two_swaps)):
        write_run(tmp_path / f"base_s{seed}", y, np.tile(np.array(base_scores)[:, None], (1, 5)))
        write_run(tmp_path / f"seg_s{seed}", y, np.tile(np.array(perfect)[:, None], (1, 5)))
    text, records = grid4.endpoint_table([0, 1], resamples=50)
    names = [name for name, _ in synthetic.LOCALISED]
    assert [r["endpoint"] for r in records] == [*names, "macro"]
    for record in records:  # every class has the same columns here: the same numbers
        assert record["delta"] == pytest.approx(1.0 - (0.75 + 0.5) / 2)
        np.testing.assert_allclose(record["per_seed"], [0.25, 0.5])
        half = stats.t.ppf(0.975, 1) * np.std([0.25, 0.5], ddof=1) / np.sqrt(2)
        np.testing.assert_allclose(record["t_interval"], [0.375 - half, 0.375 + half])
        assert record["ci_cases"][0] <= record["delta"] <= record["ci_cases"][1]
    assert "+25.00, +50.00 (2/2 > 0)" in text


def test_endpoint_table_refuses_runs_of_other_cases(tmp_path, monkeypatch):
    """The bootstraps pair the runs' rows: a run whose rows list the cases in another order is refused."""
    monkeypatch.setattr(grid4, "OUT", tmp_path)
    y, scores = np.eye(4, 5, dtype=np.float32), np.full((4, 5), 0.5)
    write_run(tmp_path / "base_s0", y, scores)
    write_run(tmp_path / "seg_s0", y[::-1], scores)
    with pytest.raises(SystemExit, match="predictions_test.csv do not list the same cases"):
        grid4.endpoint_table([0], resamples=5)


def test_learning_table_shows_the_lobes_dice_beside_the_mean(tmp_path, monkeypatch):
    """Three lobes at Dice 0.2, the heart at 0.8 (the report's mean over all: 0.35); the lobes' mean 0.2; CE
    1 and 3 in the two seeds, 2 on average."""
    monkeypatch.setattr(grid4, "OUT", tmp_path)
    dice = {name: 0.2 for name in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_middle_lobe_right")}
    dice.update(heart=0.8, mean=0.35)
    for seed, ce in ((0, 1.0), (1, 3.0)):
        (tmp_path / f"seg_s{seed}").mkdir()
        report = dict(grid=[4, 6, 6], rows={"seg head": dict(ce=ce, dice=dice)})
        grid4.utils.write_json(str(tmp_path / f"seg_s{seed}" / "seg_report_test.json"), report)
    text, _ = grid4.learning_table([0, 1])
    assert "head grid 4x6x6" in text
    cells = [f"{ce} / 0.350 / 0.200" for ce in ("1.000", "3.000", "2.000")]  # seed 0, seed 1, mean
    assert text.splitlines()[-1].split() == ["seg", "head", *" ".join(cells).split()]


def test_a_bootstrap_p_value_of_zero_is_written_as_a_bound():
    """No resample crossed 0: the p-value is below the smallest one 2,000 resamples can show (2 / 2000)."""
    assert grid4.compare.p_text(0.0, 2000) == "p < 0.001"
    assert grid4.compare.p_text(0.0123, 2000) == "p = 0.012"
