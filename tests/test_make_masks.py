"""make_masks.py on the real TotalSegmentator example data (CPU, offline; paper §2.1).

The example CT (3 mm, upper abdomen) and TotalSegmentator's own fast-mode output for it are in
../shared/data/totalsegmentator_example; its README lists the reference voxel counts used below.
"""

import csv
import json
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
from ctkit import ct_io, mask_qc, prep, structures, synthetic
from ctkit.regions import MERGED, REGIONS
from helpers import EXAMPLE, make_masks_cli, train_cli
from totalseg_standin import make_standin

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="TotalSegmentator example data not found")

# example_seg_fast.nii.gz, from its README: liver 39350, spleen 9630, kidney_left 3676, kidney_right 3996,
# bowel = stomach 4748 + duodenum 1018 + small_bowel 991 + colon 12772 + esophagus 0
REFERENCE_COUNTS = {1: 39350, 2: 9630, 3: 3676, 4: 3996, 5: 4748 + 1018 + 991 + 12772}
SCHEME, TABLE = prep.totalseg_scheme()
STAMP = prep.mask_stamp(SCHEME, TABLE)


def old_merge(region):
    """The merge the masks had before they stored TotalSegmentator's whole map: TotalSegmentator id -> the
    region's label 1..n (bowel = its five parts), written out again from TotalSegmentator's class map."""
    ids = {name: i for i, name in TABLE.items()}
    lut = np.zeros(256, np.uint8)
    for label, structure in enumerate(REGIONS[region]["structures"], start=1):
        for name in MERGED.get(structure, (structure,)):
            lut[ids[name]] = label
    return lut


def paper(region):
    """The lookup table of --structures paper on TotalSegmentator's scheme."""
    return structures.lookup_table(structures.parse("paper", TABLE, region)[1], TABLE)


def run(src, dst, region="abdomen", *extra):
    make_masks_cli("--src", src, "--dst", dst, "--region", region, "--device", "cpu", *extra)


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


def run_example(example_case, out="out", *extra):
    run(example_case / "src", example_case / out, "abdomen", "--from-totalseg", example_case / "ts", *extra)


def test_paper_structures_give_the_old_merge_and_the_reference_class_sums():
    seg = np.asarray(nib.load(EXAMPLE / "example_seg_fast.nii.gz").dataobj)
    for region in REGIONS:
        np.testing.assert_array_equal(paper(region)[seg], old_merge(region)[seg])
    counts = np.bincount(paper("abdomen")[seg].ravel(), minlength=6)
    assert {k: int(counts[k]) for k in REFERENCE_COUNTS} == REFERENCE_COUNTS
    chest = paper("chest")[seg]  # lung bases only: 265 LUL... and no heart in this volume
    assert np.count_nonzero(chest == 1) == 265 and np.count_nonzero(chest == 2) == 1254
    assert np.count_nonzero(chest == 5) == 2579 and np.count_nonzero(chest == 6) == 0


def test_from_totalseg_on_the_example(example_case):
    run_example(example_case)
    ct, mask, ct_affine, mask_affine = stored(example_case / "out", "example")
    source = nib.load(EXAMPLE / "example_ct_sm.nii.gz")  # RAS, 3 mm: only x and y are refined to 1.5 mm
    assert ct.shape == mask.shape == (243, 201, 30) and ct.dtype == np.int16 and mask.dtype == np.uint8
    np.testing.assert_allclose(ct_affine, mask_affine)
    np.testing.assert_allclose(ct_affine, source.affine @ np.diag([0.5, 0.5, 1, 1]), atol=1e-4)
    # trilinear resampling keeps the original samples exactly where the grids coincide
    np.testing.assert_array_equal(ct[::2, ::2], np.clip(source.get_fdata(), -1000, 1000))
    counts = np.bincount(paper("abdomen")[mask].ravel(), minlength=6)  # the stored map: all 117 classes
    assert {k: int(counts[k]) for k in REFERENCE_COUNTS} == {k: 4 * v for k, v in REFERENCE_COUNTS.items()}
    assert prep.nifti_layout(example_case / "out" / "mask" / "example.nii")["description"] == STAMP
    assert prep.read_scheme(example_case / "out") == (SCHEME, TABLE, STAMP)


def test_quality_control_summary_and_preview(example_case):
    run_example(example_case, "out", "--preview", "1")
    with open(example_case / "out" / "masks_summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    # 3 x 3 x 3 mm voxels of the reference map, each resampled into four 1.5 x 1.5 x 3 mm ones
    for label, structure in enumerate(REGIONS["abdomen"]["structures"], start=1):
        assert float(row[f"{structure}_ml"]) == pytest.approx(REFERENCE_COUNTS[label] * 27 / 1000, abs=0.01)
    assert row["missing"] == "" and row["tiny"] == ""
    assert float(row["extent_z_mm"]) == 30 * 3.0 and float(row["extent_x_mm"]) == 243 * 1.5
    assert "liver" in row["edge"].split(";")  # a 30-slice excerpt of a scan cuts through the liver
    assert (example_case / "out" / "preview" / "example.png").stat().st_size > 20_000
    mask = np.asarray(nib.load(example_case / "out" / "mask" / "example.nii").dataobj)
    mask[mask == 1] = 0  # no spleen (TotalSegmentator's class 1): reported as missing
    qc = mask_qc.case_row(
        "x", mask, np.diag([1.5, 1.5, 3.0, 1]), mask_qc.qc_structures(SCHEME, TABLE, "abdomen")
    )
    assert qc["missing"] == "spleen" and qc["spleen_ml"] == 0


def test_dicom_series_matches_reference_reader_and_grid():
    import SimpleITK as sitk

    folder = EXAMPLE / "example_ct_dicom"
    hu, affine = ct_io.read_dicom_series(folder)
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
    assert ct_io.same_voxels(seg.shape, seg.affine, hu.shape, affine)
    # every world point of our voxel (i, j, k) is TotalSegmentator's voxel (i, 511 - j, k)
    ijk = np.array([[0, 0, 0, 1], [511, 100, 19, 1], [37, 511, 5, 1]]).T
    theirs = ijk * [[1], [-1], [1], [1]] + [[0], [511], [0], [0]]
    np.testing.assert_allclose(affine @ ijk, seg.affine @ theirs, atol=1e-3)


def test_dicom_through_make_masks_with_existing_totalseg(tmp_path):
    shutil.copytree(EXAMPLE / "example_ct_dicom", tmp_path / "src" / "patient7" / "series3")
    (tmp_path / "ts").mkdir()
    shutil.copy(EXAMPLE / "example_seg_dicom.nii.gz", tmp_path / "ts" / "patient7_series3.nii.gz")
    run(tmp_path / "src", tmp_path / "out", "abdomen", "--from-totalseg", tmp_path / "ts")
    ct, mask, affine, _ = stored(tmp_path / "out", "patient7_series3")
    assert ct.shape == mask.shape and np.allclose(np.diag(affine)[:3], [1.5, 1.5, 3.0])
    seg = np.asarray(nib.load(EXAMPLE / "example_seg_dicom.nii.gz").dataobj)
    before = np.bincount(old_merge("abdomen")[seg].ravel(), minlength=6)[1:]
    after = np.bincount(paper("abdomen")[mask].ravel(), minlength=6)[1:]
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
    run_example(example_case)
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
    hu, affine = ct_io.read_npz(tmp_path / "src" / "trn00001.npz")
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    shape, out_affine = ct_io.target_grid(hu.shape, affine)
    ct = ct_io.resample(hu, affine, shape, out_affine, 1, -1024)  # RAS (x, y, z)
    x, y, z = np.argwhere(ct > 400).mean(0) / np.array(ct.shape)
    assert x < 0.3 and y > 0.7 and z > 0.8


def write_ctrate_original(example_case, intercept, name="train_1_a_1"):
    """An original CT-RATE file: stored values (HU - intercept, never negative), a blank header, and its row
    of the metadata CSV; the out-of-field-of-view fill is stored as 0."""
    source = nib.load(EXAMPLE / "example_ct_sm.nii.gz")
    raw = np.clip(np.asarray(source.dataobj).astype(np.int32) - intercept, 0, None)  # unsigned, as stored
    raw[:10, :10] = 0  # out of the field of view: intercept HU (-8192 on some scanners)
    (example_case / "raw").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), example_case / "raw" / f"{name}.nii.gz")
    lps = np.diag([-1, -1, 1, 1]) @ source.affine
    orientation = (np.concatenate([lps[:3, 0], lps[:3, 1]]) / 3).tolist()
    row = {
        "VolumeName": f"{name}.nii.gz",
        "RescaleSlope": "1",
        "RescaleIntercept": str(intercept),
        "XYSpacing": "[3.0, 3.0]",
        "ZSpacing": "3.0",
        "ImagePositionPatient": str(lps[:3, 3].tolist()),
        "ImageOrientationPatient": str(orientation),
    }
    with open(example_case / "train_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        writer.writeheader()
        writer.writerow(row)
    shutil.copy(EXAMPLE / "example_seg_fast.nii.gz", example_case / "ts" / f"{name}.nii.gz")


@pytest.mark.parametrize("intercept", [-1024, -8192])
def test_ctrate_original_files_with_metadata(example_case, intercept):
    """--metadata restores HU and geometry of an original file, whatever its RescaleIntercept."""
    write_ctrate_original(example_case, intercept)
    source = nib.load(EXAMPLE / "example_ct_sm.nii.gz")  # the reference: the same HU a stored value can hold
    hu = np.maximum(np.asarray(source.dataobj).astype(np.int32), intercept)
    nib.save(nib.Nifti1Image(hu, source.affine), example_case / "src" / "example.nii.gz")
    metadata = ("--metadata", example_case / "train_metadata.csv")
    run(
        example_case / "raw",
        example_case / "out_raw",
        "abdomen",
        "--from-totalseg",
        example_case / "ts",
        *metadata,
    )
    run_example(example_case)
    reference, original = (
        stored(example_case / "out", "example"),
        stored(example_case / "out_raw", "train_1_a_1"),
    )
    near = np.zeros(reference[0].shape, bool)
    near[:20, :20] = True  # the corner stored as 0 (and its interpolated border)
    np.testing.assert_array_equal(original[0][~near], reference[0][~near])
    assert (original[0][:19, :19] == -1000).all()  # -1024 or -8192 HU, clipped to -1000
    for a, b in zip(reference[1:], original[1:]):  # mask and affines
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_ctrate_fixed_file_given_with_metadata_is_refused(example_case):
    write_ctrate_original(example_case, -1024)
    shutil.copy(EXAMPLE / "example_ct_sm.nii.gz", example_case / "raw" / "train_1_a_1.nii.gz")  # HU already
    metadata = ("--metadata", example_case / "train_metadata.csv")
    message = (
        r"train_1_a_1.nii.gz: .*never negative: this is already HU \(a \*_fixed file.*without --metadata"
    )
    with pytest.raises(SystemExit, match=message):
        run(
            example_case / "raw",
            example_case / "out",
            "abdomen",
            "--from-totalseg",
            example_case / "ts",
            *metadata,
        )


def test_ctrate_case_missing_from_its_segmentation_folder_is_reported(example_case):
    (example_case / "ts" / "example.nii.gz").rename(example_case / "ts" / "other.nii.gz")
    with pytest.raises(SystemExit, match="example.nii.gz.*no label map named example"):
        run_example(example_case)


def test_inputs_are_searched_without_the_maps_and_with_exclusions(example_case):
    """A dataset root holding the volumes and, beside them, folders of segmentations: the --from-totalseg
    folder is not taken for input, and other folders can be excluded with --exclude."""
    root = example_case / "src"
    shutil.move(example_case / "ts", root / "segmentations")  # the maps under --src
    run(root, example_case / "out", "abdomen", "--from-totalseg", root / "segmentations")
    assert prep.is_done(example_case / "out", "example", STAMP)
    (root / "other_maps").mkdir()
    shutil.copy(EXAMPLE / "example_seg_fast.nii.gz", root / "other_maps" / "example.nii.gz")
    with pytest.raises(SystemExit, match=r"two inputs give case id example: .* --exclude 'other_maps/\*'"):
        run(root, example_case / "out2", "abdomen", "--from-totalseg", root / "segmentations")
    run(
        root,
        example_case / "out2",
        "abdomen",
        "--from-totalseg",
        root / "segmentations",
        "--exclude",
        "other_maps/*",
    )
    assert prep.is_done(example_case / "out2", "example", STAMP)


def test_one_prep_folder_holds_one_scheme_and_a_foreign_folder_is_refused(example_case, tmp_path):
    run_example(example_case)
    (tmp_path / "ratic.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    with pytest.raises(SystemExit, match=r"labels.json: this folder holds masks of scheme 'totalseg_total'"):
        run(
            example_case / "src",
            example_case / "out",
            "abdomen",
            "--from-masks",
            example_case / "ts",
            "--label-map",
            tmp_path / "ratic.json",
        )
    (example_case / "out" / "labels.json").unlink()
    with pytest.raises(
        SystemExit, match=r"labels.json is missing: .* not a folder of this make_masks.py.*--dst"
    ):
        train_cli(
            "--dataset", "radchest", "--data-path", tmp_path, "--prep-dir", example_case / "out", "--seg"
        )


def test_totalsegmentator_path_with_standin_model(example_case, monkeypatch):
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(example_case / "random_model"))
    make_standin(example_case / "random_model")
    write_flipped(EXAMPLE / "example_ct_sm.nii.gz", example_case / "src" / "flipped.nii.gz")
    run(example_case / "src", example_case / "out")  # the real TotalSegmentator code path, random weights
    ct, mask, ct_affine, mask_affine = stored(example_case / "out", "example")
    assert mask.shape == ct.shape == (243, 201, 30) and np.allclose(ct_affine, mask_affine)
    assert set(np.unique(mask)) <= set(TABLE) | {0}
    for a, b in zip(stored(example_case / "out", "example"), stored(example_case / "out", "flipped")):
        np.testing.assert_array_equal(a, b)  # the LPS copy is the same case once preprocessed
    ids = {name: i for i, name in TABLE.items()}
    for bias, region, label in (("colon", "abdomen", ids["colon"]), ("heart", "chest", ids["heart"])):
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
        run_example(example_case)
    assert all(prep.is_done(example_case / "out", c, STAMP) for c in ("example", "second"))
    assert not (example_case / "out" / "ct" / "broken.nii").exists()
    summary = (example_case / "out" / "masks_summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2  # header, the two finished cases


def test_killed_run_resumes_without_recomputing_or_partial_files(example_case):
    for i in range(8):
        shutil.copy(example_case / "src" / "example.nii.gz", example_case / "src" / f"case{i}.nii.gz")
        shutil.copy(example_case / "ts" / "example.nii.gz", example_case / "ts" / f"case{i}.nii.gz")
    out = example_case / "out"
    arguments = [
        "--src",
        example_case / "src",
        "--dst",
        out,
        "--region",
        "abdomen",
        "--from-totalseg",
        example_case / "ts",
    ]
    command = [sys.executable, str(ROOT / "make_masks.py"), *map(str, arguments)]
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
        assert prep.is_done(out, case, STAMP)
        np.testing.assert_array_equal(stored(out, case)[1], stored(out, "case0")[1])
        assert json.loads((out / "qc" / f"{case}.json").read_text())["case_id"] == case
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "mask").glob("[!.]*.nii") if p.name in finished
    } == finished
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temporary files left"


def test_synthetic_files_through_make_masks_train_the_same_as_in_memory(tmp_path):
    synthetic.write_synthetic(tmp_path / "syn", {"train": 6, "val": 2, "test": 3})
    run(
        tmp_path / "syn" / "ct",
        tmp_path / "syn" / "prep",
        "chest",
        "--from-totalseg",
        tmp_path / "syn" / "totalseg",
    )
    common = ["--seg", "-b", "2", "-j", "0", "--epochs", "1"]
    for name, extra in (
        ("files", ["--data-path", tmp_path / "syn"]),
        ("memory", ["--synthetic-cases", 6, 2, 3]),
    ):
        train_cli(*common, *extra, "--output-dir", tmp_path / name)
    files, memory = ((tmp_path / name / "predictions_test.csv").read_text() for name in ("files", "memory"))
    assert files == memory  # resampling onto its own grid, storage and memory maps change nothing
