"""make_masks.py on the real TotalSegmentator example data (CPU, offline; paper §2.1).

The example CT (3 mm, upper abdomen) and TotalSegmentator's own fast-mode output for it are in
../shared/data/totalsegmentator_example; its README lists the reference voxel counts used below.
"""

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import make_masks
import synthetic
from totalseg_standin import make_standin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT.parent / "shared" / "data" / "totalsegmentator_example"
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="TotalSegmentator example data not found")

# example_seg_fast.nii.gz, from its README: liver 39350, spleen 9630, kidney_left 3676, kidney_right 3996,
# bowel = stomach 4748 + duodenum 1018 + small_bowel 991 + colon 12772 + esophagus 0
REFERENCE_COUNTS = {1: 39350, 2: 9630, 3: 3676, 4: 3996, 5: 4748 + 1018 + 991 + 12772}


def run(src, dst, region="abdomen", *extra):
    make_masks.main(
        make_masks.get_args_parser().parse_args(
            ["--src", str(src), "--dst", str(dst), "--region", region, "--device", "cpu", *extra]
        )
    )


def stored(dst, case):
    ct, mask = (nib.load(dst / sub / f"{case}.nii") for sub in ("ct", "mask"))
    return np.asarray(ct.dataobj), np.asarray(mask.dataobj), ct.affine, mask.affine


@pytest.fixture
def example_case(tmp_path):
    """src/example.nii.gz (the CT) and ts/example.nii.gz (TotalSegmentator's fast output for it)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "ts").mkdir()
    shutil.copy(EXAMPLE / "example_ct_sm.nii.gz", tmp_path / "src" / "example.nii.gz")
    shutil.copy(EXAMPLE / "example_seg_fast.nii.gz", tmp_path / "ts" / "example.nii.gz")
    return tmp_path


def test_merged_labels_equal_reference_class_sums():
    seg = np.asarray(nib.load(EXAMPLE / "example_seg_fast.nii.gz").dataobj)
    counts = np.bincount(make_masks.label_lut("abdomen")[seg].ravel(), minlength=6)
    assert {k: int(counts[k]) for k in REFERENCE_COUNTS} == REFERENCE_COUNTS
    chest = make_masks.label_lut("chest")[seg]  # lung bases only: 265 LUL... and no heart in this volume
    assert np.count_nonzero(chest == 1) == 265 and np.count_nonzero(chest == 2) == 1254
    assert np.count_nonzero(chest == 5) == 2579 and np.count_nonzero(chest == 6) == 0


def test_from_totalseg_on_the_example(example_case):
    run(example_case / "src", example_case / "out", "abdomen", "--from-totalseg", str(example_case / "ts"))
    ct, mask, ct_affine, mask_affine = stored(example_case / "out", "example")
    source = nib.load(EXAMPLE / "example_ct_sm.nii.gz")  # RAS, 3 mm: only x and y are refined to 1.5 mm
    assert ct.shape == mask.shape == (243, 201, 30) and ct.dtype == np.int16 and mask.dtype == np.uint8
    np.testing.assert_allclose(ct_affine, mask_affine)
    np.testing.assert_allclose(ct_affine, source.affine @ np.diag([0.5, 0.5, 1, 1]), atol=1e-4)
    # trilinear resampling keeps the original samples exactly where the grids coincide
    np.testing.assert_array_equal(ct[::2, ::2], np.clip(source.get_fdata(), -1000, 1000))
    counts = np.bincount(mask.ravel(), minlength=6)
    assert {k: int(counts[k]) for k in REFERENCE_COUNTS} == {k: 4 * v for k, v in REFERENCE_COUNTS.items()}


def test_dicom_series_matches_reference_reader_and_grid():
    import SimpleITK as sitk

    folder = EXAMPLE / "example_ct_dicom"
    hu, affine = make_masks.read_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    reference = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK gives (k, j, i)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    lps[:3, 3] = image.GetOrigin()
    np.testing.assert_array_equal(hu, reference.astype(np.float32))
    np.testing.assert_allclose(affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)
    assert hu.min() == -1024 and hu.shape == (512, 512, 20)
    seg = nib.load(EXAMPLE / "example_seg_dicom.nii.gz")  # TotalSegmentator's output, stored L,A,S
    assert make_masks.same_voxels(seg.shape, seg.affine, hu.shape, affine)
    # every world point of our voxel (i, j, k) is TotalSegmentator's voxel (i, 511 - j, k)
    ijk = np.array([[0, 0, 0, 1], [511, 100, 19, 1], [37, 511, 5, 1]]).T
    np.testing.assert_allclose(
        affine @ ijk, seg.affine @ (ijk * [[1], [-1], [1], [1]] + [[0], [511], [0], [0]]), atol=1e-3
    )


def test_dicom_through_make_masks_with_existing_totalseg(tmp_path):
    shutil.copytree(EXAMPLE / "example_ct_dicom", tmp_path / "src" / "patient7" / "series3")
    (tmp_path / "ts").mkdir()
    shutil.copy(EXAMPLE / "example_seg_dicom.nii.gz", tmp_path / "ts" / "patient7_series3.nii.gz")
    run(tmp_path / "src", tmp_path / "out", "abdomen", "--from-totalseg", str(tmp_path / "ts"))
    ct, mask, affine, _ = stored(tmp_path / "out", "patient7_series3")
    assert ct.shape == mask.shape and np.allclose(np.diag(affine)[:3], [1.5, 1.5, 3.0])
    seg = np.asarray(nib.load(EXAMPLE / "example_seg_dicom.nii.gz").dataobj)
    before = np.bincount(make_masks.label_lut("abdomen")[seg].ravel(), minlength=6)[1:]
    after = np.bincount(mask.ravel(), minlength=6)[1:]
    volume_ratio = (0.9765625**2 * 2.0) / (1.5 * 1.5 * 3.0)  # voxel volume before / after
    for b, a in zip(before, after):  # same organ volumes in mm^3, up to nearest-neighbour sampling
        assert b == a == 0 or abs(a / (b * volume_ratio) - 1) < 0.1, (before, after)


def write_flipped(src_path, dst_path):
    """The same image stored in LPS order: voxels reversed along i and j, affine compensating."""
    img = nib.load(src_path)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(img.shape[:2]) - 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1].copy(), img.affine @ flip), dst_path)
    assert nib.aff2axcodes(nib.load(dst_path).affine) == ("L", "P", "S")


def test_lps_storage_gives_the_same_preprocessed_case(example_case):
    write_flipped(EXAMPLE / "example_ct_sm.nii.gz", example_case / "src" / "flipped.nii.gz")
    write_flipped(EXAMPLE / "example_seg_fast.nii.gz", example_case / "ts" / "flipped.nii.gz")
    run(example_case / "src", example_case / "out", "abdomen", "--from-totalseg", str(example_case / "ts"))
    for a, b in zip(stored(example_case / "out", "example"), stored(example_case / "out", "flipped")):
        np.testing.assert_array_equal(a, b)


def test_radchest_npz_keeps_the_patients_left_on_the_left(tmp_path):
    # RAD-ChestCT stores (superior->inferior, anterior->posterior, right->left) at 0.8 mm: put a marker in the
    # patient's left-anterior-superior corner region and find it at high S, high A, low R (= left) after
    # resampling to RAS
    volume = np.full((50, 40, 30), -1000, np.int16)
    volume[2:6, 3:7, 22:27] = 800  # near the top slice, anterior rows, columns towards the patient's left
    (tmp_path / "src").mkdir()
    np.savez_compressed(tmp_path / "src" / "trn00001.npz", ct=volume)
    hu, affine = make_masks.read_npz(tmp_path / "src" / "trn00001.npz")
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    shape, out_affine = make_masks.target_grid(hu.shape, affine)
    ct = make_masks.resample(hu, affine, shape, out_affine, 1, -1024)  # RAS (x, y, z)
    x, y, z = np.argwhere(ct > 400).mean(0) / np.array(ct.shape)
    assert x < 0.3 and y > 0.7 and z > 0.8


def test_ctrate_original_files_with_metadata(example_case):
    """An original CT-RATE file has stored values and a blank header; --metadata restores HU and geometry."""
    source = nib.load(EXAMPLE / "example_ct_sm.nii.gz")
    raw = np.asarray(source.dataobj).astype(np.int32) + 1024  # stored = HU - intercept
    (example_case / "raw").mkdir()
    nib.save(nib.Nifti1Image(raw, np.eye(4)), example_case / "raw" / "train_1_a_1.nii.gz")
    lps = np.diag([-1, -1, 1, 1]) @ source.affine
    row = {
        "VolumeName": "train_1_a_1.nii.gz",
        "RescaleSlope": "1",
        "RescaleIntercept": "-1024",
        "XYSpacing": "[3.0, 3.0]",
        "ZSpacing": "3.0",
        "ImagePositionPatient": str(lps[:3, 3].tolist()),
        "ImageOrientationPatient": str((np.concatenate([lps[:3, 0], lps[:3, 1]]) / 3).tolist()),
    }
    with open(example_case / "train_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        writer.writeheader()
        writer.writerow(row)
    shutil.copy(EXAMPLE / "example_seg_fast.nii.gz", example_case / "ts" / "train_1_a_1.nii.gz")
    run(
        example_case / "raw",
        example_case / "out_raw",
        "abdomen",
        "--from-totalseg",
        str(example_case / "ts"),
        "--metadata",
        str(example_case / "train_metadata.csv"),
    )
    run(example_case / "src", example_case / "out", "abdomen", "--from-totalseg", str(example_case / "ts"))
    for a, b in zip(stored(example_case / "out", "example"), stored(example_case / "out_raw", "train_1_a_1")):
        np.testing.assert_allclose(a, b, atol=1e-4)
    shutil.copy(EXAMPLE / "example_ct_sm.nii.gz", example_case / "raw" / "train_1_a_1.nii.gz")  # HU already
    with pytest.raises(SystemExit, match="already HU"):
        run(
            example_case / "raw",
            example_case / "out_fixed",
            "abdomen",
            "--from-totalseg",
            str(example_case / "ts"),
            "--metadata",
            str(example_case / "train_metadata.csv"),
        )


def test_ctrate_case_missing_from_its_segmentation_folder_is_reported(example_case):
    (example_case / "ts" / "example.nii.gz").rename(example_case / "ts" / "other.nii.gz")
    with pytest.raises(SystemExit, match="example.nii.gz.*no TotalSegmentator file named example"):
        run(
            example_case / "src", example_case / "out", "abdomen", "--from-totalseg", str(example_case / "ts")
        )


def test_totalsegmentator_path_with_standin_model(example_case, monkeypatch):
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(example_case / "random_model"))
    make_standin(example_case / "random_model")
    write_flipped(EXAMPLE / "example_ct_sm.nii.gz", example_case / "src" / "flipped.nii.gz")
    run(example_case / "src", example_case / "out")  # the real TotalSegmentator code path, random weights
    ct, mask, ct_affine, mask_affine = stored(example_case / "out", "example")
    assert mask.shape == ct.shape == (243, 201, 30) and np.allclose(ct_affine, mask_affine)
    assert set(np.unique(mask)) <= set(range(6))
    for a, b in zip(stored(example_case / "out", "example"), stored(example_case / "out", "flipped")):
        np.testing.assert_array_equal(a, b)  # the LPS copy is the same case once preprocessed
    for bias, region, label in (("colon", "abdomen", 5), ("heart", "chest", 6)):  # every voxel a known class
        monkeypatch.setenv("TOTALSEG_HOME_DIR", str(example_case / bias))
        make_standin(example_case / bias, bias_class=bias)
        out = example_case / f"out_{bias}"
        (example_case / "src" / "flipped.nii.gz").unlink(missing_ok=True)
        run(example_case / "src", out, region)
        assert (stored(out, "example")[1] == label).all()
        config = (example_case / bias / "config.json").read_text()
        assert '"send_usage_stats": false' in config


def test_shards_split_the_cases_without_overlap():
    cases = [f"train_{i}_a_1" for i in range(200)]
    shards = [{c for c in cases if make_masks.in_shard(c, f"{i}/3")} for i in range(3)]
    assert set.union(*shards) == set(cases) and sum(map(len, shards)) == len(cases)
    assert all(len(s) > 40 for s in shards)


def test_corrupt_input_is_reported_and_others_finish(example_case):
    shutil.copy(example_case / "src" / "example.nii.gz", example_case / "src" / "second.nii.gz")
    shutil.copy(example_case / "ts" / "example.nii.gz", example_case / "ts" / "second.nii.gz")
    payload = (EXAMPLE / "example_ct_sm.nii.gz").read_bytes()
    (example_case / "src" / "broken.nii.gz").write_bytes(payload[: len(payload) // 2])  # truncated gzip
    with pytest.raises(SystemExit, match=r"1 of 3 case\(s\) failed:\n.*broken\.nii\.gz"):
        run(
            example_case / "src", example_case / "out", "abdomen", "--from-totalseg", str(example_case / "ts")
        )
    assert make_masks.is_done(example_case / "out", "example") and make_masks.is_done(
        example_case / "out", "second"
    )
    assert not (example_case / "out" / "ct" / "broken.nii").exists()


def test_killed_run_resumes_without_recomputing_or_partial_files(example_case):
    for i in range(8):
        shutil.copy(example_case / "src" / "example.nii.gz", example_case / "src" / f"case{i}.nii.gz")
        shutil.copy(example_case / "ts" / "example.nii.gz", example_case / "ts" / f"case{i}.nii.gz")
    out = example_case / "out"
    command = [
        sys.executable,
        str(ROOT / "make_masks.py"),
        "--src",
        str(example_case / "src"),
        "--dst",
        str(out),
        "--region",
        "abdomen",
        "--from-totalseg",
        str(example_case / "ts"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "mask").glob("[!.]*.nii"))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "mask").glob("[!.]*.nii")}
    assert 2 <= len(finished) < 9, "the kill should land mid-run"
    (out / "ct" / ".case0.tmp.nii").write_bytes(b"half a file")  # as if killed while writing
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    for case in [f"case{i}" for i in range(8)] + ["example"]:
        assert make_masks.is_done(out, case)
        np.testing.assert_array_equal(stored(out, case)[1], stored(out, "case0")[1])
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "mask").glob("[!.]*.nii") if p.name in finished
    } == finished
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temporary files left"


def test_synthetic_files_through_make_masks_train_the_same_as_in_memory(tmp_path):
    import train

    synthetic.write_synthetic(tmp_path / "syn", {"train": 6, "val": 2, "test": 3})
    run(
        tmp_path / "syn" / "ct",
        tmp_path / "syn" / "prep",
        "chest",
        "--from-totalseg",
        str(tmp_path / "syn" / "totalseg"),
    )
    common = ["--seg", "-b", "2", "-j", "0", "--epochs", "1"]
    for name, extra in (
        ("files", ["--data-path", str(tmp_path / "syn")]),
        ("memory", ["--synthetic-cases", "6", "2", "3"]),
    ):
        train.main(
            train.get_args_parser().parse_args([*common, *extra, "--output-dir", str(tmp_path / name)])
        )
    files, memory = ((tmp_path / name / "predictions_test.csv").read_text() for name in ("files", "memory"))
    assert files == memory  # resampling onto its own grid, storage and memory maps change nothing
