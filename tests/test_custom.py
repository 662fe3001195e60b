"""Your own CTs: a labels CSV in a hospital export's layout, the structure set chosen when
training, and masks from another segmenter with its own label map."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ctkit import ct_io, labels, prep
from ctkit.regions import REGIONS
from helpers import make_masks_cli, phantom, train_cli, write_dicom_series

FINDINGS = ("pneumothorax", "nodule")
UID = "1.2.840.113619.2.55.3.{}"  # series folders named by UIDs, as many PACS exports are


def write_nifti(path, ct, ts, lps):
    """A NIfTI CT and its TotalSegmentator map on the same grid, stored RAS or LPS (x and y reversed)."""
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    if lps:
        ct, ts = ct[::-1, ::-1], ts[::-1, ::-1]
        affine = np.diag([-1.5, -1.5, 3.0, 1.0])
        affine[:2, 3] = [1.5 * (ct.shape[0] - 1), 1.5 * (ct.shape[1] - 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ct), affine), path)
    return np.ascontiguousarray(ts), affine


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """hospital/export/<patient>/<study UID>/<series UID>/IM000n (no suffix) for 6 patients, two of them
    with a second series, plus NIfTI scans in RAS and LPS; TotalSegmentator maps in ts/; labels.csv with
    path and patient_id columns and no split."""
    root = tmp_path_factory.mktemp("custom") / "hospital"
    rng, rows = np.random.default_rng(5), []
    for p in range(8):
        patient = f"PAT{p:03d}"
        for s in range(2 if p < 2 else 1):
            ct, ts = phantom(10 * p + s, "custom")
            if p < 6:
                folder = root / "export" / patient / UID.format(1000 + p) / UID.format(2000 + 10 * p + s)
                write_dicom_series(folder, ct, (-30.0, -30.0, -60.0), signed_12_bit=False)
                for f in folder.iterdir():  # PACS exports carry no suffix: found by the DICM marker
                    f.rename(folder / f"IM{int(f.stem):04d}")
                affine = ct_io.read_dicom_series(folder)[1]
                ts_map, path = np.ascontiguousarray(ts[::-1, ::-1]), folder.relative_to(root)
            else:
                path = f"nifti/{patient}_{'lps' if p == 7 else 'ras'}.nii.gz"
                ts_map, affine = write_nifti(root / path, ct, ts, lps=p == 7)
            (root / "ts").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(ts_map, affine), root / "ts" / f"{prep.case_id(root / path)}.nii.gz")
            rows.append([str(path), patient, *rng.integers(0, 2, len(FINDINGS))])
    rows[0][2:], rows[1][2:] = [1, 1], [0, 0]  # both values in every split of the drawn patient split
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "patient_id", *FINDINGS], *rows])
    make_masks_cli("--src", root / "export", "--dst", root / "prep", "--from-totalseg", root / "ts")
    make_masks_cli("--src", root / "nifti", "--dst", root / "prep", "--from-totalseg", root / "ts")
    return root


def train_custom(root, out, *extra):
    flags = [
        "--dataset",
        "custom",
        "--labels",
        root / "labels.csv",
        "--region",
        "chest",
        "--data-path",
        root,
        "--prep-dir",
        root / "prep",
        "--seg",
        "-b",
        "2",
        "-j",
        "0",
        "--epochs",
        "1",
        "--test-fraction",
        "0.25",
        "--crop",
        "16",
        "32",
        "32",
    ]
    train_cli(*flags, *extra, "--output-dir", out)
    config = json.loads((out / "config.json").read_text())
    return config["task"], torch.load(out / "checkpoint.pth", weights_only=True)["model"]


def train_with_labels(labels, root, out):
    """train.py on a custom dataset with this labels CSV and every other flag at its default."""
    flags = "--dataset custom --region chest".split()
    train_cli(*flags, "--labels", labels, "--data-path", root, "--output-dir", out)


def test_custom_csv_trains_with_any_structure_set_from_one_mask_run(export, tmp_path):
    assert len(list((export / "prep" / "mask").glob("*.nii"))) == 10  # 8 DICOM series + RAS + LPS
    runs = {
        "paper": 6,
        "lung_upper_lobe_left,right=lung_upper_lobe_right+lung_middle_lobe_right+lung_lower_lobe_right": 2,
        "all": 117,
    }
    for spec, n in runs.items():
        task, state = train_custom(export, tmp_path / f"run{n}", "--structures", spec)
        assert len(task["structures"]) == n and state["seg_head.weight"].shape[0] == n + 1
        assert task["classes"] == list(FINDINGS) and task["scheme"].startswith(
            "make_masks scheme=totalseg_total"
        )
    assert task["structure_ids"][9] == [10]  # 'all': TotalSegmentator's class 10 is lung_upper_lobe_left
    split = {r["patient_id"]: r["split"] for r in csv.DictReader(open(tmp_path / "run6" / "split.csv"))}
    assert sorted(split) == [f"PAT{p:03d}" for p in range(8)] and list(split.values()).count("test") == 2
    for n in (2, 117):  # the same seed draws the same patient split for every run
        assert (tmp_path / f"run{n}" / "split.csv").read_text() == (
            tmp_path / "run6" / "split.csv"
        ).read_text()
    predictions = list(csv.DictReader(open(tmp_path / "run6" / "predictions_test.csv")))
    patients = {r["patient_id"] for r in predictions}
    assert all(split[p] == "test" for p in patients) and len(predictions) >= 2


def test_the_lps_and_ras_scans_are_the_same_case_once_prepared(export):
    ras, lps = (nib.load(export / "prep" / "mask" / f"PAT00{p}_{o}.nii") for p, o in ((6, "ras"), (7, "lps")))
    assert np.allclose(ras.affine[:3, :3], lps.affine[:3, :3]) and np.diag(ras.affine)[0] > 0


def test_resume_keeps_the_split_and_a_changed_structure_set_is_refused(export, tmp_path):
    train_custom(export, tmp_path / "run")
    before = (tmp_path / "run" / "split.csv").read_text()
    with pytest.raises(SystemExit, match="trained with task="):
        train_custom(export, tmp_path / "run", "--resume", "--structures", "all")
    (tmp_path / "run" / "predictions_test.csv").unlink()
    train_custom(export, tmp_path / "run", "--resume")  # a requeued job: the same command again
    assert (tmp_path / "run" / "predictions_test.csv").exists()
    assert (tmp_path / "run" / "split.csv").read_text() == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[3].__setitem__(2, ""), r"labels.csv row 4 column pneumothorax: '' is not 0 or 1"),
        (lambda rows: rows[2].__setitem__(3, "yes"), r"labels.csv row 3 column nodule: 'yes' is not 0 or 1"),
        (
            lambda rows: rows[5].__setitem__(0, "export/nowhere"),
            r"labels.csv row 6 column path: 'export/nowhere'",
        ),
        (lambda rows: rows.append(rows[1]), r"labels.csv rows 2 and 12: case .* twice"),
        (lambda rows: [r.__delitem__(slice(2, None)) for r in rows], r"labels.csv: no finding columns"),
        (lambda rows: rows[0].__setitem__(3, "pneumothorax"), r"labels.csv: column\(s\) \['pneumothorax'\]"),
        (lambda rows: rows[4].append("1"), r"labels.csv row 5: 5 fields, the header has 4"),
        (lambda rows: rows.insert(2, []) or rows[5].append("1"), r"labels.csv row 5: 5 fields"),  # blank line
        (
            lambda rows: (
                [r.append(s) for r, s in zip(rows, ["split", "train", "test", *["train"] * 20])]
                + [rows[2].__setitem__(1, rows[1][1])]
            ),
            r"labels.csv rows 2 and 3: patient PAT000 in both train and test",
        ),
    ],
    ids=[
        "blank",
        "not-0-1",
        "no-such-path",
        "duplicate",
        "no-findings",
        "column-twice",
        "extra-field",
        "extra-field-after-a-blank-line",
        "patient-in-two-splits",
    ],
)
def test_bad_labels_csv_names_file_row_and_column(export, tmp_path, edit, message):
    rows = list(csv.reader(open(export / "labels.csv")))
    edit(rows)
    bad = export / f"bad_{tmp_path.name}.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(SystemExit, match=message.replace("labels.csv", bad.name)):
        train_with_labels(bad, export, tmp_path / "run")
    assert not (tmp_path / "run" / "split.csv").exists()


def test_a_run_that_stops_after_drawing_its_split_leaves_no_split(export, tmp_path):
    """The split is drawn while the dataset is built; a run refused after that (here: its --resume checkpoint
    does not exist) removes it again, and the folder it made, so a corrected rerun draws anew."""
    with pytest.raises(SystemExit, match=r"nothing.pth: no such checkpoint file"):
        train_custom(export, tmp_path / "run", "--resume", tmp_path / "nothing.pth")
    assert not (tmp_path / "run").exists()


def test_a_labels_csv_that_is_not_utf8_is_named(export, tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(
        (export / "labels.csv").read_bytes().replace(b"pneumothorax", "pneumothorax_é".encode("latin-1"))
    )
    with pytest.raises(SystemExit, match=r"latin1.csv: not UTF-8 text \(byte \d+\); save it as UTF-8"):
        train_with_labels(bad, export, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_label_map_with_one_id_twice_and_a_failed_runs_scheme(tmp_path):
    for text, keys in (
        ('{"1": "spleen", "01": "kidney_left"}', "'1' and '01'"),
        ('{"1": "a", "1": "b"}', "'1' and '1'"),
    ):
        (tmp_path / "map.json").write_text(text)
        with pytest.raises(
            labels.BadInput, match=rf"^{tmp_path / 'map.json'}: keys {keys} are both label 1$"
        ):
            prep.read_label_map(tmp_path / "map.json")
    prep.write_scheme(tmp_path / "prep", "mine", {1: "spleen"})  # a run that then failed: no masks written
    prep.write_scheme(tmp_path / "prep", "mine", {1: "kidney_left"})  # its corrected rerun: replaced
    assert prep.read_scheme(tmp_path / "prep")[1] == {1: "kidney_left"}
    (tmp_path / "prep" / "mask").mkdir()
    (tmp_path / "prep" / "mask" / "case.nii").write_bytes(b"")  # once masks exist, the scheme is theirs
    other = (
        r"this run makes 'mine' with other labels \(id 1: kidney_left there, liver here\); use another --dst"
    )
    with pytest.raises(labels.BadInput, match=other):
        prep.write_scheme(tmp_path / "prep", "mine", {1: "liver"})


def test_a_single_valued_finding_is_a_warning(tmp_path, export, capsys):
    rows = list(csv.reader(open(export / "labels.csv")))
    for r in rows[1:]:
        r[3] = "0"
    path = export / "single.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    tables = labels.custom_tables(path, export / "prep", tmp_path / "split.csv", 0, 0.0, 0.25)
    assert "column(s) nodule have a single value in the training split" in capsys.readouterr().out
    assert sum(len(t[0]) for t in tables.values()) == 10


def test_masks_of_another_segmenter_train_with_its_class_names(tmp_path):
    """RATIC's own segmentations/: 1 liver, 2 spleen, 3 left kidney, 4 right kidney, 5 bowel."""
    root = tmp_path / "own"
    table = {"1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right", "5": "bowel"}
    (root / "segmentations").mkdir(parents=True)
    (root / "label_map.json").write_text(json.dumps(table))
    rows = []
    for i in range(8):
        ct, _ = phantom(i, "own")
        seg = np.zeros(ct.shape, np.uint8)
        seg[4:12, 4:12, 2:8], seg[20:30, 10:20, 4:10] = 1, 5  # a liver and some bowel
        for sub, array in (("ct", ct), ("segmentations", seg)):
            (root / sub).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1])), root / sub / f"scan{i}.nii.gz")
        rows.append([f"scan{i}", f"p{i}", i % 2, (i // 2) % 2])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "patient_id", "a", "b"], *rows])
    make_masks_cli(
        "--src",
        root / "ct",
        "--dst",
        root / "prep",
        "--from-masks",
        root / "segmentations",
        "--label-map",
        root / "label_map.json",
    )
    assert prep.read_scheme(root / "prep")[:2] == ("label_map", {int(k): v for k, v in table.items()})
    header = (root / "prep" / "masks_summary.csv").read_text().splitlines()[0]
    assert all(f"{name}_ml" in header for name in table.values())  # QC covers every class of the scheme
    common = [
        "--dataset",
        "custom",
        "--labels",
        root / "labels.csv",
        "--region",
        "abdomen",
        "--data-path",
        root,
        "--seg",
        "-b",
        "2",
        "-j",
        "0",
        "--epochs",
        "1",
        "--crop",
        16,
        32,
        32,
        "--test-fraction",
        "0.25",
    ]
    for spec, names in (
        ("paper", ["liver", "spleen", "kidney_left", "kidney_right", "bowel"]),
        ("liver,rest=spleen+bowel", ["liver", "rest"]),
    ):
        train_cli(*common, "--structures", spec, "--output-dir", tmp_path / spec)
        task = json.loads((tmp_path / spec / "config.json").read_text())["task"]
        assert task["structures"] == names and task["scheme"].startswith("make_masks scheme=label_map")
        dice = json.loads((tmp_path / spec / "dice_test.json").read_text())
        assert set(dice) == {*names, "mean"}
    with pytest.raises(SystemExit, match=r"--structures heart: \['heart'\] not in the stored label scheme"):
        train_cli(*common, "--structures", "heart", "--output-dir", tmp_path / "heart")


def test_structure_specs_parse_with_spaces_and_refuse_reuse():
    from ctkit import structures

    table = {1: "liver", 2: "spleen", 7: "colon", 9: "small_bowel"}
    names, ids = structures.parse(" liver , bowel = colon + small_bowel", table, "abdomen")
    assert names == ("liver", "bowel") and ids == ((1,), (7, 9))
    lut = structures.lookup_table(ids, table)
    assert lut[[0, 1, 2, 7, 9, 3]].tolist() == [0, 1, 0, 2, 2, structures.UNKNOWN]  # 3: not in the scheme
    with pytest.raises(labels.BadInput, match="each name and stored label once"):
        structures.parse("liver,a=liver+spleen", table, "abdomen")


def test_the_lookup_on_the_batch_is_the_table_applied_to_each_stored_window():
    """Samples carry the stored labels; CTDataset.seg_classes maps a batch where it is (train.py: on the
    device) exactly as the numpy table maps each window, and names the case of a label outside the scheme."""
    import data
    from ctkit import structures

    table = {1: "liver", 2: "spleen", 7: "colon", 9: "small_bowel"}
    names, ids = structures.parse("liver,bowel=colon+small_bowel", table, "abdomen")
    lut = structures.lookup_table(ids, table)
    rng = np.random.default_rng(0)
    masks = [rng.choice([0, 1, 2, 7, 9], (6, 8, 8)).astype(np.uint8) for _ in range(3)]
    volumes = [(np.zeros(m.shape, np.int16), m) for m in masks]
    dataset = data.CTDataset(
        "abc", volumes, np.zeros((3, 1)), (6, 8, 8), (4, 6, 6), True, with_mask=True, lut=lut
    )
    batch = torch.utils.data.default_collate([dataset[k] for k in range(3)])
    assert set(np.unique(batch["mask"])) <= {0, 1, 2, 7, 9}  # as stored
    classes = dataset.seg_classes(batch["mask"], batch["index"])
    assert classes.dtype == torch.uint8 and torch.equal(classes, torch.from_numpy(lut[batch["mask"].numpy()]))
    masks[1][:] = 3  # a label the scheme does not have
    batch = torch.utils.data.default_collate([dataset[k] for k in range(3)])
    with pytest.raises(labels.BadInput, match="^b: a mask label that is not in the folder's label scheme"):
        dataset.seg_classes(batch["mask"], batch["index"])
    deferred = dataset.seg_classes(batch["mask"], batch["index"], check=False)  # as training: checked later
    assert deferred[1].max() == 0 and torch.equal(deferred[[0, 2]], classes[[0, 2]])
    with pytest.raises(labels.BadInput, match="^b: a mask label"):
        dataset.check_labels()
    dataset.check_labels()  # each flag is read once


def test_a_long_scheme_name_keeps_the_stamp_within_the_nifti_description():
    stamp = prep.mask_stamp("ratic_segmentations_liver_spleen_kidneys_bowel_v2", {1: "liver"})
    assert len(stamp) <= 79 and stamp != prep.mask_stamp(
        "ratic_segmentations_liver_spleen_kidneys_bowel_v3", {1: "liver"}
    )


def test_a_split_drawn_with_other_settings_is_refused(tmp_path):
    labels.patient_split({"a", "b", "c", "d"}, tmp_path / "split.csv", seed=0, test_fraction=0.25)
    again = labels.patient_split({"a", "b", "c", "d"}, tmp_path / "split.csv", seed=0, test_fraction=0.25)
    assert sorted(again.values()) == ["test", "train", "train", "train"]
    with pytest.raises(labels.BadInput, match="drawn with seed 0, this run asks for seed 1"):
        labels.patient_split({"a", "b", "c", "d"}, tmp_path / "split.csv", seed=1, test_fraction=0.25)


def test_evidence_by_anatomy_on_your_own_data(export, tmp_path):
    import evaluate

    train_custom(export, tmp_path / "run")
    args = evaluate.get_args_parser().parse_args([str(tmp_path / "run"), "--evidence"])
    (table,) = evaluate.main(args)
    assert list(table) == list(FINDINGS)
    paper = list(REGIONS["chest"]["structures"])
    assert list(table["nodule"])[1:] == [*paper, "outside"]
    assert (tmp_path / "run" / "evidence_by_anatomy_test.csv").exists()
