"""CT-RATE, RAD-ChestCT and RATIC in their published layouts: tiny fixtures -> make_masks.py -> train.py.

Each fixture uses the real file and column names; volumes are small phantoms stored as each dataset
stores them (LPS NIfTI, RAD-ChestCT .npz, DICOM series), with TotalSegmentator-style multilabel files.
"""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import model
from ctkit import ct_io, labels, prep
from helpers import TS_IDS, make_masks_cli, phantom, train_cli, write_dicom_series

CTCLIP_ORDER = [  # the order of the columns in the distributed CSV (not the report order)
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]
RATIC_TRAIN_CSV = [
    "patient_id",
    "bowel_healthy",
    "bowel_injury",
    "extravasation_healthy",
    "extravasation_injury",
    "kidney_healthy",
    "kidney_low",
    "kidney_high",
    "liver_healthy",
    "liver_low",
    "liver_high",
    "spleen_healthy",
    "spleen_low",
    "spleen_high",
    "any_injury",
]


def write_csv(path, header, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def run_make_masks(src, dst, region, ts, *extra):
    make_masks_cli("--src", src, "--dst", dst, "--region", region, "--from-totalseg", ts, *extra)


def run_train(dataset, root, out, *extra):
    short = "--seg --epochs 1 --max-steps 2 -b 2 -j 0 --crop 16 32 32".split()
    train_cli("--dataset", dataset, "--data-path", root, *short, "--output-dir", out, *extra)
    with open(out / "predictions_test.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def ctrate(tmp_path):
    """dataset/{train,valid}_fixed/<split>_<patient>/<split>_<patient>_<scan>/<volume>.nii.gz (LPS, HU), the
    ts_seg/ts_total mirror of it, and multi_abnormality_labels."""
    root = tmp_path / "CT-RATE"
    lps = np.diag([-1.5, -1.5, 3.0, 1.0])
    volumes = {
        "train": ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_b_1", "train_4_a_1"],
        "valid": ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"],
    }
    rng = np.random.default_rng(0)
    for split, names in volumes.items():
        rows = []
        for i, name in enumerate(names):
            ct, ts = phantom(i, split)
            folder = Path(split + "_fixed") / "_".join(name.split("_")[:2]) / "_".join(name.split("_")[:3])
            for sub, array in (("dataset", ct), ("dataset/ts_seg/ts_total", ts)):
                (root / sub / folder).mkdir(parents=True, exist_ok=True)
                nib.save(
                    nib.Nifti1Image(array[::-1, ::-1].copy(), lps), root / sub / folder / f"{name}.nii.gz"
                )
            rows.append([f"{name}.nii.gz", *rng.integers(0, 2, len(CTCLIP_ORDER))])
        rows[0][1:] = [0] * len(CTCLIP_ORDER)
        rows[1][1:] = [1] * len(CTCLIP_ORDER)  # both values in every column
        write_csv(
            root / "dataset" / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
            ["VolumeName", *CTCLIP_ORDER],
            rows,
        )
    for split in volumes:
        run_make_masks(
            root / "dataset" / f"{split}_fixed",
            root / "prep",
            "chest",
            root / "dataset" / "ts_seg" / "ts_total" / f"{split}_fixed",
        )
    return root


def test_ctrate_trains_and_reports_in_table7_order(ctrate, tmp_path):
    rows = run_train("ctrate", ctrate, tmp_path / "run")
    assert [r["case_id"] for r in rows] == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    assert [k[5:] for k in rows[0] if k.startswith("true:")] == list(labels.CTRATE_CLASSES)
    with open(ctrate / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv") as f:
        truth = list(csv.DictReader(f))
    for row, expected in zip(rows, truth):  # labels follow the column names, not their position
        assert all(float(row[f"true:{c}"]) == float(expected[c]) for c in labels.CTRATE_CLASSES)
    metrics = (tmp_path / "run" / "metrics_test.csv").read_text()
    assert "Arterial wall calcification" in metrics.splitlines()[1]


def test_ctrate_bad_inputs_name_the_file_or_column(ctrate, tmp_path):
    label_file = ctrate / "dataset" / "multi_abnormality_labels" / "train_predicted_labels.csv"
    text = label_file.read_text()
    label_file.write_text(text.replace("Lung nodule", "Lung nodules"))
    with pytest.raises(
        SystemExit, match=r"train_predicted_labels.csv: missing column\(s\) \['Lung nodule'\]"
    ):
        run_train("ctrate", ctrate, tmp_path / "a")
    label_file.write_text(text)
    (ctrate / "prep" / "mask" / "train_2_a_1.nii").unlink()  # a volume with no mask under --seg
    with pytest.raises(SystemExit, match=r"prep/mask/train_2_a_1.nii"):
        run_train("ctrate", ctrate, tmp_path / "b")
    rows = run_train("ctrate", ctrate, tmp_path / "c", "--skip-missing")  # a counted, listed skip instead
    assert len(rows) == 3
    mask = nib.load(ctrate / "prep" / "mask" / "train_1_a_1.nii")  # a mask on another grid than its CT
    nib.save(
        nib.Nifti1Image(np.asarray(mask.dataobj)[:-1].copy(), mask.affine),
        ctrate / "prep" / "mask" / "train_1_a_1.nii",
    )
    with pytest.raises(SystemExit, match=r"mask/train_1_a_1.nii: grid .* does not match its CT"):
        run_train("ctrate", ctrate, tmp_path / "d", "--skip-missing")
    (ctrate / "prep" / "mask" / "train_1_a_1.nii").unlink()
    for f in (ctrate / "prep" / "ct").glob("valid_*"):
        f.unlink()
    with pytest.raises(SystemExit, match=r"test split of ctrate is empty"):
        run_train("ctrate", ctrate, tmp_path / "e", "--skip-missing")


def test_ctrate_holdout_validation_is_by_patient(ctrate):
    tables = labels.ctrate_tables(ctrate)
    labels.hold_out(tables, 0.5)
    train_patients, val_patients = set(tables["train"][2]), set(tables["val"][2])
    assert train_patients and val_patients and not train_patients & val_patients
    assert sorted(tables["train"][0] + tables["val"][0]) == sorted(
        ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_b_1", "train_4_a_1"]
    )


@pytest.fixture
def radchest(tmp_path):
    """<NoteAcc_DEID>.npz volumes (key 'ct', superior->inferior, anterior->posterior, right->left), the three
    img{train,valid,test}_Abnormality_and_Location_Labels.csv with '<abnormality>*<location>' columns."""
    root, ts_dir = tmp_path / "RAD-ChestCT", tmp_path / "rad_totalseg"
    (root / "volumes").mkdir(parents=True)
    ts_dir.mkdir()
    columns = [
        f"{a}*{loc}"
        for a in (*labels.RADCHEST_CLASSES, "nodulegr1cm", "mass")
        for loc in ("left_upper", "right_lower")
    ]
    splits = {
        "train": ["trn00001", "trn00002", "trn00003", "trn00004"],
        "valid": ["val00001", "val00002"],
        "test": ["tst00001", "tst00002", "tst00003"],
    }
    rng = np.random.default_rng(1)
    for split, ids in splits.items():
        rows = []
        for i, case in enumerate(ids):
            ct, ts = phantom(i, split)
            stored = np.ascontiguousarray(ct[::-1, ::-1, ::-1].transpose(2, 1, 0))  # S->I, A->P, R->L
            np.savez_compressed(root / "volumes" / f"{case}.npz", ct=stored)
            # the map of a header-less volume: same axes, but an origin and spacing of the converter's choice
            affine = ct_io.npz_affine(spacing=1.0)
            affine[:3, 3] = [12.5, -40.0, 7.0]
            map_ = np.ascontiguousarray(ts[::-1, ::-1, ::-1].transpose(2, 1, 0))
            nib.save(nib.Nifti1Image(map_, affine), ts_dir / f"{case}.nii.gz")
            rows.append([case, *rng.integers(0, 2, len(columns))])
        rows[0][1:] = [0] * len(columns)
        rows[1][1:] = [1] * len(columns)
        write_csv(root / f"img{split}_Abnormality_and_Location_Labels.csv", ["NoteAcc_DEID", *columns], rows)
    for _ in range(2):  # the output folder inside --src is not mistaken for input on a rerun
        run_make_masks(root, root / "prep", "chest", ts_dir)
    return root


def test_radchest_classes_match_abnormality_names_exactly(radchest):
    path = radchest / "imgtest_Abnormality_and_Location_Labels.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    header, row = rows[0], rows[3]
    row[1:] = ["0"] * (len(header) - 1)
    row[header.index("nodulegr1cm*left_upper")] = "1"  # must not count as 'nodule'
    row[header.index("calcification*right_lower")] = "1"
    write_csv(path, header, rows[1:])
    tables = labels.radchest_tables(radchest)
    values = dict(zip(labels.RADCHEST_CLASSES, tables["test"][1][2]))
    assert values["nodule"] == 0 and values["calcification"] == 1 and sum(values.values()) == 1
    assert sorted(tables) == ["test", "train"] and len(tables["train"][0]) == 6  # train + valid for training
    assert tables["test"][0] == ["tst00001", "tst00002", "tst00003"]


def test_radchest_trains_and_keeps_lobes_on_their_side(radchest, tmp_path, capsys):
    rows = run_train("radchest", radchest, tmp_path / "run")
    assert [r["case_id"] for r in rows] == ["tst00001", "tst00002", "tst00003"]
    assert [k[5:] for k in rows[0] if k.startswith("true:")] == list(labels.RADCHEST_CLASSES)
    mask = np.asarray(nib.load(radchest / "prep" / "mask" / "trn00001.nii").dataobj)  # RAS (x, y, z)
    left, right = (np.argwhere(mask == TS_IDS[k])[:, 0].mean() for k in (1, 3))  # TotalSegmentator's ids
    assert left < right  # the left upper lobe at low x
    assert "QC structures): 0 of 9 case(s) miss one" in capsys.readouterr().out  # from masks_summary.csv


def test_radchest_map_in_another_orientation_is_refused(radchest, tmp_path):
    ts_dir = tmp_path / "rad_totalseg"
    case = ts_dir / "trn00002.nii.gz"
    img = nib.load(case)  # an export that dropped the axes: the .npz array saved with an identity affine
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.eye(4)), case)
    with pytest.raises(SystemExit, match=r"trn00002.nii.gz: shape .* \(RAS\) does not match the CT's"):
        run_make_masks(radchest, tmp_path / "prep2", "chest", ts_dir)


def test_a_mask_of_another_scheme_is_refused_before_training(radchest, tmp_path):
    """A mask copied in from a folder made with another segmenter's scheme: only its stamp tells."""
    mask_path = next((radchest / "prep" / "mask").glob("[!.]*.nii"))
    img = nib.load(mask_path)
    other = prep.mask_stamp("other", {1: "liver", 2: "spleen"})
    ct_io.save_nifti(np.asarray(img.dataobj), img.affine, mask_path, other)
    with pytest.raises(
        SystemExit, match=rf"{mask_path.name}: 'make_masks scheme=other.*a mask of another scheme"
    ):
        run_train("radchest", radchest, tmp_path / "run")
    assert not (tmp_path / "run" / "iterations.csv").exists()


def test_data_path_one_level_too_high_names_the_folders(radchest, ratic, tmp_path):
    found = r"prep/ct does not exist \(found prepared folder\(s\) .*RAD-ChestCT/prep"
    with pytest.raises(SystemExit, match=found):
        run_train("radchest", tmp_path, tmp_path / "run")
    (ratic / "prep" / "ratic_split.csv").unlink(missing_ok=True)
    with pytest.raises(SystemExit, match=r"rsna-2023-abdominal-trauma-detection/prep \(--prep-dir"):
        run_train("ratic", ratic.parent, tmp_path / "run")
    assert not list(tmp_path.rglob("ratic_split.csv")), "nothing is written before the inputs are validated"


@pytest.fixture
def ratic(tmp_path):
    """train.csv, train_series_meta.csv and train_images/<patient_id>/<series_id>/<n>.dcm."""
    root = tmp_path / "rsna-2023-abdominal-trauma-detection"
    (root / "ts").mkdir(parents=True)
    rng = np.random.default_rng(2)
    label_rows, series_rows = [], []
    for p in range(10):
        patient = str(10000 + 37 * p)
        organs = {o: rng.integers(0, 3) for o in ("kidney", "liver", "spleen")}
        bowel, extravasation = rng.integers(0, 2), rng.integers(0, 2)
        row = {
            "patient_id": patient,
            "bowel_healthy": 1 - bowel,
            "bowel_injury": bowel,
            "extravasation_healthy": 1 - extravasation,
            "extravasation_injury": extravasation,
            **{
                f"{o}_{g}": int(organs[o] == i)
                for o in organs
                for i, g in enumerate(("healthy", "low", "high"))
            },
        }
        row["any_injury"] = int(bowel or extravasation or any(organs.values()))
        label_rows.append([row[c] for c in RATIC_TRAIN_CSV])
        for s in range(1 if p == 0 else 2):  # most patients have two series
            series = str(200 + 11 * p + s)
            ct, ts = phantom(p, "ratic")
            write_dicom_series(
                root / "train_images" / patient / series, ct, (-30.0, -30.0, -100.0), signed_12_bit=s == 0
            )
            hu, affine = ct_io.read_dicom_series(root / "train_images" / patient / series)
            np.testing.assert_array_equal(hu, ct[::-1, ::-1])
            nib.save(
                nib.Nifti1Image(np.ascontiguousarray(ts[::-1, ::-1]), affine),
                root / "ts" / f"{patient}_{series}.nii.gz",
            )
            series_rows.append([patient, series, 150.0, 0])
    write_csv(root / "train.csv", RATIC_TRAIN_CSV, label_rows)
    write_csv(
        root / "train_series_meta.csv",
        ["patient_id", "series_id", "aortic_hu", "incomplete_organ"],
        series_rows,
    )
    run_make_masks(root / "train_images", root / "prep", "abdomen", root / "ts")
    return root


def test_ratic_split_is_by_patient_saved_and_reused(ratic, tmp_path):
    split_file = str(tmp_path / "split.csv")
    tables = labels.ratic_tables(ratic, split_file, seed=0)
    train_patients, test_patients = set(tables["train"][2]), set(tables["test"][2])
    assert not train_patients & test_patients and len(train_patients | test_patients) == 10
    assert len(test_patients) == round(10 * 647 / 3147)  # 2,500 / 647 scaled to the patients present
    assert all(c.split("_")[0] == p for c, p in zip(tables["test"][0], tables["test"][2]))
    again = labels.ratic_tables(ratic, split_file, seed=123)  # the saved split wins over a new seed
    assert again["test"][0] == tables["test"][0]
    with open(ratic / "train.csv") as f:
        rows = {r["patient_id"]: r for r in csv.DictReader(f)}
    for case, row in zip(tables["train"][0], tables["train"][1]):
        expected = rows[case.split("_")[0]]
        assert all(float(expected[c]) == v for c, v in zip(labels.RATIC_COLUMNS, row))


def test_ratic_trains_with_its_heads(ratic, tmp_path):
    rows = run_train("ratic", ratic, tmp_path / "run")
    assert [k[5:] for k in rows[0] if k.startswith("true:")] == list(labels.RATIC_COLUMNS)
    for r in rows:
        p = {c: float(r[f"prob:{c}"]) for c in labels.RATIC_COLUMNS}
        assert math.isclose(p["bowel_healthy"] + p["bowel_injury"], 1, abs_tol=1e-5)
        assert math.isclose(p["kidney_healthy"] + p["kidney_low"] + p["kidney_high"], 1, abs_tol=1e-5)
    assert (ratic / "prep" / "ratic_split.csv").exists()
    metrics = json.loads((tmp_path / "run" / "metrics_test.json").read_text())
    patients = {r["patient_id"] for r in rows}  # the predictions are per series, the metrics per patient
    assert metrics["unit"] == "patient" and metrics["cases"] == len(patients) < len(rows)


def test_any_injury_is_one_minus_product_of_healthy():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    probs = model.ratic_probabilities(logits)
    x = logits.double().numpy()
    sig = 1 / (1 + np.exp(-x[:, :2]))
    soft = [
        np.exp(x[:, 2 + 3 * k : 5 + 3 * k]) / np.exp(x[:, 2 + 3 * k : 5 + 3 * k]).sum(1, keepdims=True)
        for k in range(3)
    ]
    healthy = (1 - sig[:, 0]) * (1 - sig[:, 1]) * soft[0][:, 0] * soft[1][:, 0] * soft[2][:, 0]
    np.testing.assert_allclose(probs["any_injury"].numpy(), 1 - healthy, rtol=1e-5)
    np.testing.assert_allclose(probs["liver_high"].numpy(), soft[1][:, 2], rtol=1e-5)


def test_ratic_loss_uses_the_paper_sample_weights(monkeypatch):
    logits = torch.tensor(
        [
            [0.5, -1.0, 1.0, 0.0, -1.0, 0.2, 0.1, 0.3, -0.5, 0.5, 0.0],
            [-2.0, 0.3, 0.0, 1.0, 0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 2.0],
        ]
    )
    # case 0: bowel injury, extravasation, kidney high, liver healthy, spleen low; case 1: all healthy
    columns = {
        "bowel_injury": [1, 0],
        "extravasation_injury": [1, 0],
        "kidney_high": [1, 0],
        "kidney_healthy": [0, 1],
        "liver_healthy": [1, 1],
        "spleen_low": [1, 0],
        "spleen_healthy": [0, 1],
        "any_injury": [1, 0],
    }
    y = torch.tensor([[columns.get(c, [0, 0])[i] for c in labels.RATIC_COLUMNS] for i in range(2)]).float()

    def bce(z, y):
        return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))

    def ce(z, k):
        return math.log(sum(math.exp(v) for v in z)) - z[k]

    bowel = (2 * bce(0.5, 1) + 1 * bce(-2.0, 0)) / 3
    extravasation = (6 * bce(-1.0, 1) + 1 * bce(0.3, 0)) / 7
    kidney = (4 * ce([1.0, 0.0, -1.0], 2) + 1 * ce([0.0, 1.0, 0.5], 0)) / 5
    liver = (1 * ce([0.2, 0.1, 0.3], 0) + 1 * ce([1.0, -1.0, 0.0], 0)) / 2
    spleen = (2 * ce([-0.5, 0.5, 0.0], 1) + 1 * ce([0.0, 0.0, 2.0], 0)) / 3
    p_any = model.ratic_probabilities(logits)["any_injury"].double().numpy()
    any_injury = (6 * -math.log(p_any[0]) + 1 * -math.log(1 - p_any[1])) / 7
    expected = (bowel + extravasation) / 2 + (kidney + liver + spleen) / 3 + 0.1 * any_injury

    def refused_under_cuda_autocast(*args, **kwargs):
        raise RuntimeError("binary_cross_entropy is unsafe to autocast")  # what CUDA autocast does

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy", refused_under_cuda_autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training with --amp
        loss = model.classification_loss(logits, y, "ratic")
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), expected, rel_tol=1e-5)
