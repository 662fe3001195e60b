"""evaluate.py: bootstrap, threshold source, multi-run tables, Figure 3, Dice, and prediction of one CT."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import evaluate
import predict
from ctkit import compare, labels, learning_report, utils
from helpers import prepared_synthetic, train_cli


def test_auc_columns_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 4)).astype(float)
    p = np.round(rng.random((60, 4)), 1)  # many ties
    y[:, 3] = 1  # one label value: undefined
    aucs = compare.auc_columns(y, p)
    for k in range(3):
        assert math.isclose(aucs[k], roc_auc_score(y[:, k], p[:, k]))
    assert math.isnan(aucs[3])


def test_bootstrap_identical_runs_give_zero():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, (80, 3)).astype(float), rng.random((80, 3))
    delta, low, high, p_value = compare.paired_bootstrap(y, [p], [p.copy()], resamples=1000, seed=0)
    assert delta == 0 and low <= 0 <= high and p_value == 1.0


def test_bootstrap_run_better_on_every_case_has_ci_above_zero():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (80, 3)).astype(float)
    noisy = rng.random((80, 3))
    better = 0.5 * noisy + 0.5 * y  # every case moves towards its label
    delta, low, high, p_value = compare.paired_bootstrap(y, [better], [noisy], resamples=1000, seed=0)
    assert delta > 0 and low > 0 and p_value < 0.01
    again = compare.paired_bootstrap(y, [better], [noisy], resamples=1000, seed=0)
    assert again == (delta, low, high, p_value)  # seeded


def test_two_level_bootstrap_widens_the_interval_by_the_spread_of_seeds():
    """Two arms with the same mean over seeds: the case bootstrap of the means sees no difference whatever
    the seeds do; the two-level bootstrap, which resamples the seeds too, must be at least as wide."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (120, 3)).astype(float)
    base = rng.random((120, 3))
    good, bad = 0.6 * base + 0.4 * y, 0.6 * base + 0.4 * (1 - y)  # one seed learned the task, one the reverse
    arm_a, arm_b = [good, bad], [bad, good]  # same two seeds in both arms: no difference in expectation
    case_only = compare.paired_bootstrap(y, arm_a, arm_b, resamples=400, seed=0)
    two_level = compare.paired_bootstrap(y, arm_a, arm_b, resamples=400, seed=0, seeds_too=True)
    assert case_only[0] == two_level[0] == 0
    assert case_only[2] - case_only[1] < 1e-9  # the case resampling keeps the arms' means equal
    assert two_level[2] - two_level[1] > 0.3 and two_level[1] < 0 < two_level[2]


def test_thresholds_from_validation(tmp_path):
    # Youden's threshold on the validation predictions: 0.6
    y_val, p_val = np.array([[0], [0], [1], [1]]), np.array([[0.1], [0.3], [0.6], [0.9]])
    y_test, p_test = np.array([[0], [1], [1], [0]]), np.array([[0.5], [0.55], [0.7], [0.65]])
    labels.write_predictions(tmp_path / "predictions_val.csv", list("abcd"), y_val, p_val, ["x"])
    labels.write_predictions(tmp_path / "predictions_test.csv", list("efgh"), y_test, p_test, ["x"])
    rows, _ = evaluate.evaluate_predictions(
        str(tmp_path / "predictions_test.csv"), thresholds_from="val", quiet=True
    )
    assert rows[0]["threshold"] == 0.6 and rows[0]["sensitivity"] == 0.5 and rows[0]["specificity"] == 0.5
    saved = json.loads((tmp_path / "metrics_test.json").read_text())
    assert "validation split" in saved["thresholds"]
    rows, _ = evaluate.evaluate_predictions(str(tmp_path / "predictions_test.csv"), quiet=True)
    assert rows[0]["threshold"] == 0.7 and rows[0]["specificity"] == 1.0  # chosen on the test set itself


def test_dice_on_hand_made_masks():
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :2] = 1  # 32 voxels of structure 1
    pred[0, :1] = 1  # 16 of them predicted: Dice 2*16/(16+32) = 2/3
    pred[0, 3, 0, 0] = 2  # structure 2 predicted where it is absent: case 0 does not count for it
    target[1, :, :, :2] = 2  # case 1: structure 2, 32 voxels, all found: Dice 1; structure 1 absent
    pred[1, :, :, :2] = 2
    counts = learning_report.dice_counts(pred, target, 3)
    assert counts.tolist() == [[[16, 16, 32], [0, 1, 0]], [[0, 0, 0], [32, 32, 32]]]
    summary = learning_report.dice_summary(counts.numpy(), ["a", "b"])
    assert math.isclose(summary["a"]["dice"], 2 / 3) and summary["a"]["cases"] == 1
    assert summary["b"]["dice"] == 1.0 and math.isclose(summary["mean"]["dice"], (2 / 3 + 1) / 2)


def fake_run(folder, model, seg, seed, y, p):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"dataset": "synthetic", "model": model, "seg": seg, "seed": seed, "pretrained": None})
    )
    labels.write_predictions(
        folder / "predictions_test.csv", [f"c{i}" for i in range(len(y))], y, p, ["cardiomegaly", "emphysema"]
    )
    log = utils.CSVLog(folder / "iterations.csv", utils.StepLog.FIELDS)
    values = [[0, i, 1 / (i + 1) + seg, 1 / (i + 1), int(seg), 2 + np.sin(i), 1e-4, 0.01] for i in range(30)]
    log.append([dict(zip(utils.StepLog.FIELDS, row)) for row in values])
    sharpness = {"lambda_max": 10.0 + 2 * seg + seed, "increase_0.02": 0.01, "increase_0.05": 0.05 + seed}
    (folder / "sharpness.json").write_text(json.dumps(sharpness))


def test_comparison_tables_and_figure(tmp_path, capsys):
    y = np.array([[0, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 0]], float)
    perfect = y * 0.8 + 0.1
    half = np.array([[0.4, 0.6], [0.3, 0.7], [0.5, 0.5], [0.6, 0.4], [0.2, 0.9], [0.8, 0.1]])
    fake_run(tmp_path / "noseg_s0", "r3d", False, 0, y, half)
    fake_run(tmp_path / "noseg_s1", "r3d", False, 1, y, half)
    fake_run(tmp_path / "seg_s0", "r3d", True, 0, y, perfect)
    fake_run(tmp_path / "seg_s1", "r3d", True, 1, y, perfect)
    expected_half = np.mean([roc_auc_score(y[:, k], half[:, k]) for k in range(2)])
    evaluate.main(
        evaluate.get_args_parser().parse_args(
            [str(tmp_path / n) for n in ("noseg_s0", "noseg_s1", "seg_s0", "seg_s1")]
            + [
                "--figure",
                str(tmp_path / "fig3.png"),
                "--bootstrap",
                "200",
                "--roc",
                str(tmp_path / "roc.png"),
            ]
        )
    )
    text = (tmp_path / "comparison.txt").read_text()
    auc_line = next(line for line in text.splitlines() if line.startswith("ResNet") and "auc" in line)
    assert f"{100 * expected_half:.2f} ± 0.00" in auc_line and "100.00 ± 0.00" in auc_line
    assert f"{100 * (1 - expected_half):+.2f}" in auc_line
    assert "(200 resamples, 6 cases, 2 vs 2 run(s))" in text and "over seeds and cases (two-level)" in text
    lines = text.splitlines()
    table7 = lines[lines.index(next(line for line in lines if "per class" in line)) + 1]
    assert "CDM" in table7 and "EMP" in table7 and "AVG" in table7
    records = json.loads((tmp_path / "comparison.json").read_text())
    bootstrap = next(r for r in records if r["metric"] == "delta_auc")
    assert (
        math.isclose(bootstrap["delta"], 1 - expected_half)
        and bootstrap["ci"][0] <= bootstrap["delta"] <= bootstrap["ci"][1]
    )
    assert (tmp_path / "fig3.png").stat().st_size > 10_000 and (tmp_path / "roc.png").stat().st_size > 10_000
    flatness = next(line for line in text.splitlines() if line.startswith("sharpness (ResNet + S"))
    assert "lambda_max 12.5 ± 0.71" in flatness and "increase_0.05 0.55 ± 0.71" in flatness  # seeds 0 and 1


def test_roc_points_match_sklearn_and_a_single_run_gets_its_figure(tmp_path):
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.random(50)
    fpr, tpr, _ = roc_curve(y, p)
    got, auc = compare.roc_points(y, p, fpr)
    highest = [tpr[fpr == f].max() for f in fpr]  # sklearn's curve: at each false-positive rate its top
    np.testing.assert_allclose(got, highest)
    assert math.isclose(auc, roc_auc_score(y, p))
    yy = np.array([[0, 1], [1, 0], [0, 0], [1, 1]], float)
    fake_run(tmp_path / "one", "r3d", True, 0, yy, yy * 0.5 + 0.2)
    evaluate.main(
        evaluate.get_args_parser().parse_args([str(tmp_path / "one"), "--roc", str(tmp_path / "r.png")])
    )
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_smoothing_is_debiased():
    assert compare.smoothed([5.0] * 4, span=10) == pytest.approx([5.0] * 4)


def test_predict_one_ct_matches_the_training_pipeline(tmp_path, capsys):
    prepared_synthetic(tmp_path / "syn")
    train_cli(
        "--data-path",
        tmp_path / "syn",
        *"--seg -b 2 -j 0 --epochs 1 --crop 16 32 32".split(),
        "--output-dir",
        tmp_path / "run",
    )
    ct_path = tmp_path / "syn" / "ct" / "synthetic_test_0001.nii.gz"
    probs = predict.predict(str(ct_path), str(tmp_path / "run" / "checkpoint.pth"))
    with open(tmp_path / "run" / "predictions_test.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["case_id"] == "synthetic_test_0001")
    for name, p in probs.items():
        assert math.isclose(p, float(row[f"prob:{name}"]), abs_tol=2e-5)
    out = capsys.readouterr().out
    assert "thresholds from" in out and "metrics_val.json" in out and ("POSITIVE" in out or "negative" in out)


def test_per_patient_evaluation_averages_a_patients_series(tmp_path):
    classes = list(labels.RATIC_COLUMNS)
    y = np.zeros((5, len(classes)))
    y[:2, 0] = 1  # patient a (two series) has any_injury; b (two series) and c (one) do not
    p = np.full((5, len(classes)), 0.5)
    p[:, 0] = [0.9, 0.5, 0.2, 0.4, 0.6]
    path = tmp_path / "predictions_test.csv"
    labels.write_predictions(
        path, ["a_1", "a_2", "b_1", "b_2", "c_1"], y, p, classes, ["a", "a", "b", "b", "c"]
    )
    per_patient = labels.read_predictions(str(path), per="auto")  # RATIC columns: per patient
    assert per_patient["cases"] == ["a", "b", "c"] and per_patient["unit"] == "patient"
    np.testing.assert_allclose(per_patient["y_prob"][:, 0], [0.7, 0.3, 0.6])  # series means
    np.testing.assert_array_equal(per_patient["y_true"][:, 0], [1, 0, 0])
    assert len(labels.read_predictions(str(path), per="case")["cases"]) == 5
    rows, macro = evaluate.evaluate_predictions(str(path), quiet=True)
    assert json.loads((tmp_path / "metrics_test.json").read_text())["cases"] == 3
    assert rows[0]["class"] == "any_injury" and rows[0]["auc"] == 1.0  # 0.7 above 0.3 and 0.6
    y[1, 0] = 0  # the series of one patient disagree: not a patient-level label
    labels.write_predictions(
        path, ["a_1", "a_2", "b_1", "b_2", "c_1"], y, p, classes, ["a", "a", "b", "b", "c"]
    )
    with pytest.raises(ValueError, match="different labels"):
        labels.read_predictions(str(path), per="patient")


def test_a_predictions_file_of_another_name_is_never_overwritten(tmp_path):
    y, p = np.array([[0], [1], [1], [0]]), np.array([[0.1], [0.8], [0.7], [0.2]])
    labels.write_predictions(tmp_path / "mine.csv", list("abcd"), y, p, ["x"])
    before = (tmp_path / "mine.csv").read_text()
    evaluate.evaluate_predictions(str(tmp_path / "mine.csv"), quiet=True)
    assert (tmp_path / "mine.csv").read_text() == before
    assert (tmp_path / "mine.metrics.json").exists() and (tmp_path / "mine.metrics.csv").exists()
