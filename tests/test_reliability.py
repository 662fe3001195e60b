"""Crash safety, bad input, determinism and torchrun DDP on CPU (gloo)."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import model
from ctkit import ct_io, precision, synthetic, utils
from ctkit import prep as prep_folder
from ctkit.ct_io import AIR_HU
from helpers import EXAMPLE, make_masks_cli, prepared_synthetic, train_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--synthetic-cases 12 2 4 --crop 16 32 32 -b 2 -j 0 --epochs 2 --print-freq 1".split()
SEG_RUN = [*SMALL, "--seg", "--checkpoint-every", "2"]  # the shared run: 12 steps, checkpoints every 2


def run_train(out, *extra):
    train_cli(*SMALL, "--output-dir", out, *extra)
    return (out / "predictions_test.csv").read_text()


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """One finished SEG_RUN, trained once for the tests of this file; a test that changes it copies it."""
    out = tmp_path_factory.mktemp("seg_run")
    train_cli(*SEG_RUN, "--output-dir", out)
    return out


def copy_of(run, folder):
    return Path(shutil.copytree(run, folder))


def log_rows(path, fields=utils.StepLog.FIELDS[:-1]):
    """The logged values of each step, without the wall-clock data wait."""
    with open(path) as f:
        return [[row[k] for k in fields] for row in csv.DictReader(f)]


def test_two_runs_with_one_seed_write_identical_predictions(tmp_path, seg_run):
    first = (seg_run / "predictions_test.csv").read_text()
    train_cli(*SEG_RUN, "--output-dir", tmp_path / "b")
    assert (tmp_path / "b" / "predictions_test.csv").read_text() == first
    assert log_rows(seg_run / "iterations.csv") == log_rows(tmp_path / "b" / "iterations.csv")
    assert run_train(tmp_path / "c", "--seg", "--seed", "1") != first


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_result(tmp_path, seg_run):
    straight = (seg_run / "predictions_test.csv").read_text()
    out = tmp_path / "killed"
    command = [sys.executable, "train.py", *SEG_RUN, "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "iterations.csv", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 1 + 9):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = utils.load_checkpoint(out / "checkpoint.pth")
    assert 0 < state["iteration"] < 12, "killed in the second epoch, after a mid-epoch checkpoint"
    assert not (out / "predictions_test.csv").exists()
    subprocess.run(command + ["--resume"], cwd=ROOT, check=True, capture_output=True)
    assert (out / "predictions_test.csv").read_text() == straight
    assert log_rows(out / "iterations.csv") == log_rows(seg_run / "iterations.csv")
    assert not list(out.glob(".*tmp*"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = model.classification_loss, {"n": 0}

    def loss_that_breaks(logits, labels, kind):
        calls["n"] += 1
        return real(logits, labels, kind) * (float("nan") if calls["n"] == 9 else 1.0)

    monkeypatch.setattr(model, "classification_loss", loss_that_breaks)
    expected = r"^stopped: non-finite values \(loss nan.* at epoch 1 iteration 8; the last good checkpoint"
    with pytest.raises(SystemExit, match=expected):
        run_train(tmp_path, "--checkpoint-every", "4")
    state = utils.load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["iteration"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "predictions_test.csv").exists()


@pytest.fixture
def prep(tmp_path):
    return prepared_synthetic(tmp_path / "syn")


def test_train_command_line_gives_one_line_for_bad_input(prep, tmp_path):
    mask_path = prep / "prep" / "mask" / "synthetic_train_0001.nii"
    mask = nib.load(mask_path)
    labels = np.asarray(mask.dataobj).copy()
    labels[labels == labels.max()] = 200  # a label TotalSegmentator's scheme does not have (ids 1-117)
    ct_io.save_nifti(labels, mask.affine, mask_path, mask.header["descrip"].item().decode())
    short = "--seg -b 2 -j 1 --epochs 1".split()
    command = [
        sys.executable,
        "train.py",
        "--data-path",
        str(prep),
        *short,
        "--output-dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    expected = f"{mask_path}: a mask label that is not in the folder's label scheme (labels.json)"
    assert result.stderr.strip().splitlines()[-1] == f"stopped: {expected}"
    assert "Traceback" not in result.stderr


def build(root, seg=True):
    """The datasets of phantoms written to `root` and prepared into root/prep, with or without masks."""
    source = data.Source("synthetic", str(root), str(root / "prep"))
    anatomy = data.anatomy("paper", source, "chest", seg)
    return data.build_datasets(data.make_task("synthetic", anatomy=anatomy), source, 0, seg, anatomy.lut)


def test_wrong_dtype_and_affine_mismatch_name_the_file(prep):
    ct_path = prep / "prep" / "ct" / "synthetic_val_0000.nii"
    ct = nib.load(ct_path)
    ct_io.save_nifti(np.asarray(ct.dataobj).astype(np.float32), ct.affine, ct_path)
    with pytest.raises(data.BadInput, match=f"{ct_path}: data type float32, expected int16"):
        build(prep)
    flipped = ct.affine @ np.diag([1, 1, -1, 1])
    ct_io.save_nifti(np.asarray(ct.dataobj).astype(np.int16), flipped, ct_path)
    with pytest.raises(data.BadInput, match=r"mask/synthetic_val_0000.nii: grid .* does not match its CT"):
        build(prep)
    build(prep, seg=False)  # without --seg the masks are not read


def test_torn_or_compressed_volumes_are_refused(prep):
    ct_path = prep / "prep" / "ct" / "synthetic_test_0001.nii"
    ct_path.write_bytes(ct_path.read_bytes()[:-1000])
    with pytest.raises(data.BadInput, match=f"{ct_path}: file is shorter than its header says"):
        build(prep)
    with pytest.raises(data.BadInput, match="expected an uncompressed .nii"):
        prep_folder.nifti_layout(prep / "ct" / "synthetic_test_0001.nii.gz")


def test_volume_smaller_than_the_crop_is_padded():
    ct, mask, *_ = synthetic.make_phantom(np.random.default_rng(0), (10, 20, 16))
    dataset = data.CTDataset(
        ["tiny"], [(ct, mask)], np.zeros((1, 5)), (40, 60, 60), (32, 48, 48), train=True, with_mask=True
    )
    sample = dataset[0]
    assert sample["ct"].shape == (1, 32, 48, 48) and sample["mask"].shape == (32, 48, 48)
    assert (sample["ct"] == AIR_HU).sum() == 32 * 48 * 48 - ct.size + (ct == AIR_HU).sum()
    assert sample["mask"].sum() == mask.sum()


def test_empty_label_table_and_missing_column(prep):
    rows = (prep / "labels.csv").read_text().splitlines()
    (prep / "labels.csv").write_text(
        "\n".join([rows[0], *(r for r in rows[1:] if ",train," not in r)]) + "\n"
    )
    with pytest.raises(data.BadInput, match="the train split of synthetic is empty"):
        build(prep)
    (prep / "labels.csv").write_text(rows[0].replace(",emphysema", ",emphysem") + "\n")
    with pytest.raises(data.BadInput, match=r"labels.csv: missing column\(s\) \['emphysema'\]"):
        build(prep)


def test_make_masks_reports_each_bad_input_by_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    payload = (EXAMPLE / "example_ct_sm.nii.gz").read_bytes()
    (src / "tail_cut.nii.gz").write_bytes(payload[:-200])  # header and most voxels decode; the end does not
    img = nib.load(EXAMPLE / "example_ct_sm.nii.gz")
    values = img.get_fdata(dtype=np.float32)
    values[5, 5, 5], values[6, 6, 6] = np.nan, np.inf
    nib.save(nib.Nifti1Image(values, img.affine), src / "nan.nii.gz")
    nib.save(nib.Nifti1Image(values[..., None].repeat(2, -1), img.affine), src / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), src / "good.nii.gz")
    with pytest.raises(SystemExit) as error:
        make_masks_cli("--src", src, "--dst", tmp_path / "out", "--region", "abdomen", "--from-totalseg", src)
    message = str(error.value)
    assert message.startswith("4 of 4 case(s) failed") or message.startswith("3 of 4 case(s) failed")
    assert f"{src / 'tail_cut.nii.gz'}: " in message
    assert f"{src / 'nan.nii.gz'}: ValueError: 2 non-finite voxels" in message
    assert f"{src / 'four_d.nii.gz'}: ValueError: expected a 3D volume" in message


def test_make_masks_follows_a_linked_series_folder_and_refuses_bad_flags(tmp_path):
    """A DICOM series folder that is a symbolic link under --src is an input like any other (a link back up
    the tree is walked once); flags and inputs that cannot be used end in one line, before anything is
    written."""
    from helpers import phantom, write_dicom_series
    from make_masks import find_cases

    write_dicom_series(tmp_path / "store" / "series1", phantom(0)[0], (0.0, 0.0, 0.0), False)
    src = tmp_path / "src"
    (src / "patient").mkdir(parents=True)
    (src / "patient" / "ct").symlink_to(tmp_path / "store" / "series1", target_is_directory=True)
    (src / "patient" / "loop").symlink_to(src, target_is_directory=True)
    cases = find_cases(src)
    assert [(kind, path) for kind, path in cases.values()] == [("dicom", src / "patient" / "ct")]
    out = tmp_path / "out"
    (tmp_path / "map.json").write_text('{"1": "spleen", "01": "kidney_left"}')
    for flags, message in (
        (["--src", tmp_path / "nowhere"], f"--src {tmp_path / 'nowhere'}: no such folder"),
        (["--src", src, "--from-masks", src, "--label-map", tmp_path / "map.json"], "'1' and '01' are both"),
        (["--src", src, "--metadata", tmp_path / "none.csv"], f"{tmp_path / 'none.csv'}: "),
        (["--src", src, "--shard", "abc"], "--shard abc: give I/N with 0 <= I < N"),
        (["--src", src, "--shard", "0/0"], "--shard 0/0: give I/N with 0 <= I < N"),
        (["--src", src, "--dst", tmp_path / "store" / "series1" / "1.dcm" / "prep"], "is not a folder this"),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            make_masks_cli(*flags, *([] if "--dst" in flags else ["--dst", out]))
        assert not out.exists()


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    """Same global batches (DistributedSampler splits each permutation), every case predicted exactly once.
    With lr 0 the weights stay those of the seeded initialisation: the predictions must agree to rounding."""
    common = "--model swin --synthetic-cases 8 3 5 --crop 16 32 32 --epochs 1 --lr 0 --device cpu".split()
    common += ["-j", "0", "--print-freq", "1"]
    one = [sys.executable, "train.py", *common, "-b", "4", "--output-dir", str(tmp_path / "one")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = [*torchrun, "train.py", *common, "-b", "2", "--output-dir", str(tmp_path / "two")]
    one = subprocess.run(one, cwd=ROOT, capture_output=True, text=True)
    two = subprocess.run(
        two, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es) x batch 2 = 4" in two.stdout
    a, b = (list(csv.reader(open(tmp_path / run / "predictions_test.csv"))) for run in ("one", "two"))
    assert len(b) == 1 + 5 and [r[0] for r in a] == [r[0] for r in b]
    values = [np.array([r[2:] for r in rows[1:]], float) for rows in (a, b)]  # after case_id, patient_id
    np.testing.assert_allclose(values[0], values[1], atol=1e-5)
    metrics = [open(tmp_path / run / "metrics_test.csv").read() for run in ("one", "two")]
    assert metrics[0].splitlines()[-1][:30] == metrics[1].splitlines()[-1][:30]
    assert len(log_rows(tmp_path / "two" / "iterations.csv")) == 2  # 8 cases / (2 processes x 2) per step


def test_resume_refuses_other_settings_and_test_only_needs_a_checkpoint(tmp_path, monkeypatch, seg_run):
    run = copy_of(seg_run, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"checkpoint.pth: trained with epochs=2, now 3"):
        train_cli(*SEG_RUN, "--epochs", "3", "--output-dir", run, "--resume")
    monkeypatch.setattr(precision, "bf16_fault", lambda device_type: None)  # as on a CPU whose bf16 is right
    with pytest.raises(SystemExit, match=r"checkpoint.pth: trained with amp=False, now True"):
        train_cli(*SEG_RUN, "--amp", "--output-dir", run, "--resume")
    with pytest.raises(SystemExit, match="--test-only evaluates a checkpoint"):
        train_cli(*SEG_RUN, "--test-only")
    log = (run / "iterations.csv").read_text()
    train_cli(*SEG_RUN, "--test-only", "--resume", run / "checkpoint.pth")  # into the run's folder
    assert (run / "iterations.csv").read_text() == log  # its logs are left as they were
    best = run / "checkpoint_best.pth"  # weights only: evaluated, not trained on
    assert "optimizer" not in torch.load(best, weights_only=True)
    train_cli(*SEG_RUN, "--test-only", "--resume", best)
    with pytest.raises(SystemExit, match="holds only the best weights; resume training from checkpoint.pth"):
        train_cli(*SEG_RUN, "--output-dir", run, "--resume", best)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_a_new_run_in_a_used_folder_is_refused_unless_told_to_overwrite(tmp_path, seg_run):
    run = copy_of(seg_run, tmp_path / "run")
    (run / "sharpness.json").write_text("{}")
    before = snapshot(run)
    refused = r"holds a run \(config.json, checkpoint.pth, iterations.csv, ...\): continue it with --resume"
    with pytest.raises(SystemExit, match=refused + ", start it anew with --overwrite"):
        train_cli(*SMALL, "--output-dir", run)  # without --seg, without --resume: a new run
    assert snapshot(run) == before  # nothing written, nothing lost
    train_cli(*SMALL, "--output-dir", run, "--overwrite")
    assert not (run / "dice_test.json").exists() and not (run / "sharpness.json").exists()
    assert utils.read_json(run / "config.json")["seg"] is False


def test_a_checkpoint_taken_to_another_run_folder_is_refused_unless_told_to_overwrite(tmp_path, seg_run):
    """--resume or --test-only with a checkpoint of run A into run B's folder would mix A's weights with B's
    logs and results: refused like a new run; with --overwrite, B's files go first."""
    other = copy_of(seg_run, tmp_path / "other")
    before = snapshot(other)
    refused = r"other holds a run \(config.json, checkpoint.pth, iterations.csv, ...\)"
    for flags in (
        ["--resume", seg_run / "checkpoint.pth"],
        ["--test-only", "--resume", seg_run / "checkpoint.pth"],
    ):
        with pytest.raises(SystemExit, match=refused):
            train_cli(*SEG_RUN, *flags, "--output-dir", other)
        assert snapshot(other) == before
    train_cli(
        *SEG_RUN, "--test-only", "--resume", seg_run / "checkpoint.pth", "--output-dir", other, "--overwrite"
    )
    assert {"checkpoint.pth", "checkpoint_best.pth", "config.json", "iterations.csv"}.isdisjoint(
        os.listdir(other)
    )
    assert (other / "predictions_test.csv").exists()


def test_a_requeued_run_killed_before_its_first_checkpoint_starts_anew(tmp_path, seg_run):
    """--resume with no checkpoint yet and no result in the folder (a kill before the first checkpoint): the
    same command starts the run again, and ends as an uninterrupted run; --test-only may write elsewhere."""
    run = tmp_path / "requeued"
    run.mkdir()
    for name in ("config.json", "iterations.csv"):
        shutil.copy(seg_run / name, run / name)
    train_cli(*SEG_RUN, "--output-dir", run, "--resume")
    assert (run / "predictions_test.csv").read_text() == (seg_run / "predictions_test.csv").read_text()
    train_cli(
        *SEG_RUN, "--test-only", "--resume", seg_run / "checkpoint_best.pth", "--output-dir", tmp_path / "new"
    )
    assert (tmp_path / "new" / "predictions_test.csv").exists()


def test_a_refused_resume_changes_nothing_in_the_run_folder(tmp_path, seg_run):
    run = copy_of(seg_run, tmp_path / "run")
    before = snapshot(run)
    for other in (["--model", "swin"], []):  # other settings than the checkpoint's: here, no --seg
        with pytest.raises(SystemExit, match=r"checkpoint.pth: trained with (model='r3d'|seg=True)"):
            train_cli(*SMALL, "--checkpoint-every", "2", *other, "--output-dir", run, "--resume")
        assert snapshot(run) == before  # config.json still says what the checkpoint was trained with


def test_resume_removes_the_temporaries_of_a_killed_checkpoint_writer(tmp_path, seg_run):
    run = copy_of(seg_run, tmp_path / "run")
    for name in (".checkpoint.tmp999-0.pth", ".checkpoint_best.tmp999-1.pth", ".config.tmp999-2.json"):
        (run / name).write_bytes(b"half a file")  # as kill -9 during utils.atomic_path leaves them
    (run / ".notes").write_text("the user's")
    train_cli(*SEG_RUN, "--output-dir", run, "--resume")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".notes"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-b", "0"], "--batch-size 0: must be at least 1"),
        (["--synthetic-cases", "4", "0", "2"], "--synthetic-cases 4 0 2: must be at least 1"),
        (["--epochs", "0"], "--epochs 0: must be at least 1"),
    ],
)
def test_impossible_numbers_end_in_one_line_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_cli(*SMALL, *flags, "--output-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_cannot_be_written_ends_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"file is not a folder this process can write in"):
        train_cli(*SMALL, "--output-dir", tmp_path / "file" / "run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root may write anywhere: nothing to test
        pytest.skip("this process writes in read-only folders (root)")
    with pytest.raises(SystemExit, match=r"locked is not a folder this process can write in"):
        train_cli(*SMALL, "--output-dir", locked / "run")


def test_a_log_without_its_header_ends_in_one_line(tmp_path, seg_run):
    run = copy_of(seg_run, tmp_path / "run")
    rows = (run / "iterations.csv").read_text().splitlines()
    (run / "iterations.csv").write_text("\n".join(rows[1:]) + "\n")  # its first line lost
    command = [sys.executable, "train.py", *SEG_RUN, "--output-dir", str(run), "--resume"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "iterations.csv: header" in result.stderr.strip().splitlines()[-1]


def test_predict_ends_in_one_line_for_each_unreadable_ct_or_checkpoint(tmp_path, seg_run):
    """tools/predict.py on CTs and checkpoints that cannot be read: one line naming the file, exit status 1"""
    import predict

    ct = np.asarray(nib.load(EXAMPLE / "example_ct_sm.nii.gz").dataobj)
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "good.nii.gz")
    good = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "no_extension").write_bytes(good)
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    np.savez(tmp_path / "no_ct.npz", volume=np.zeros((4, 4, 4)))
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"\0" * 64)
    checkpoint = seg_run / "checkpoint_best.pth"
    (tmp_path / "cut.pth").write_bytes(checkpoint.read_bytes()[:5000])
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pth")
    cases = [
        (name, checkpoint, f"{name}: cannot read it as ")
        for name in ("cut.nii.gz", "no_extension", "junk.npz", "no_ct.npz", "series")
    ]
    cases[2] = ("junk.npz", checkpoint, "pickled")  # numpy refuses it as pickled data, in its own words
    cases += [
        ("good.nii.gz", tmp_path / name, f"{name}: not a") for name in ("cut.pth", "empty.pth", "foreign.pth")
    ]
    for ct_name, weights, message in cases:
        with pytest.raises(SystemExit) as stop:
            predict.cli([str(tmp_path / ct_name), "--checkpoint", str(weights)])
        text = str(stop.value)
        assert text.startswith(f"cannot classify {tmp_path / ct_name}: ") and "\n" not in text, text
        assert message in text, text


def test_evaluate_ends_in_one_line_for_bad_predictions_and_run_files(tmp_path, seg_run):
    import evaluate

    run = copy_of(seg_run, tmp_path / "run")
    rows = (run / "predictions_test.csv").read_text().splitlines()
    last = r"row 2 column prob:emphysema: '{}' is not a number in \[0, 1\]"
    for name, edit, message in (
        ("text", lambda r: r[1].rsplit(",", 1)[0] + ",high", last.format("high")),
        ("nan", lambda r: r[1].rsplit(",", 1)[0] + ",nan", last.format("nan")),
        ("torn", lambda r: r[1][: len(r[1]) // 2], r"row 2: \d+ fields, the header has \d+"),
    ):
        bad = tmp_path / f"{name}.csv"
        bad.write_text("\n".join([rows[0], edit(rows), *rows[2:]]) + "\n")
        with pytest.raises(SystemExit, match=f"{name}.csv {message}"):
            evaluate.cli([str(bad)])
    (run / "checkpoint_best.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"checkpoint_best.pth: not a readable checkpoint"):
        evaluate.cli([str(run), "--evidence"])
    (run / "config.json").write_text('{"model": "r3d", ')
    with pytest.raises(SystemExit, match=r"config.json: not a JSON file this code wrote"):
        evaluate.cli([str(run), "--evidence"])


def test_a_gantry_tilted_dicom_series_is_refused_and_an_oblique_one_read(tmp_path):
    """Slice positions sheared within the slice plane (a tilted gantry) are refused in one line naming the
    tilt and the way out, once the shift reaches half a pixel over the series; an oblique series whose
    slices follow its normal, and positions rounded to 0.01 mm, are read."""
    from pydicom import dcmread

    from helpers import phantom, write_dicom_series

    def series(name, orientation, position):  # position(z) of each slice of the axial helper series
        write_dicom_series(tmp_path / name, phantom(0)[0], (0.0, 0.0, 0.0), False)
        for path in (tmp_path / name).iterdir():
            ds = dcmread(path)
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [round(v, 2) for v in position(float(ds.ImagePositionPatient[2]))]
            ds.save_as(path)
        return tmp_path / name

    axial = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    tilted = series("tilted", axial, lambda z: [0.0, z * np.tan(np.deg2rad(15)), z])
    with pytest.raises(ValueError, match=r"a gantry-tilted series: .* \(a tilt of 15 degrees; .*dcm2niix"):
        ct_io.read_case("dicom", tilted)
    depth = 3.0 * (phantom(0)[0].shape[2] - 1)  # mm from the first slice to the last
    slight = series("slight", axial, lambda z: [0.0, 0.4 * z / depth, z])  # 0.4 mm over the series: read
    assert ct_io.read_case("dicom", slight)[0].shape == phantom(0)[0].shape
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))  # rows along x, columns 20 degrees out of y
    along_normal = [1.0, 0.0, 0.0, 0.0, c, s], lambda z: [0.0, -s * z, c * z]
    oblique = series("oblique", *along_normal)
    hu, affine = ct_io.read_case("dicom", oblique)
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    assert np.allclose(normal, [0.0, s, c], atol=1e-3)  # in RAS: y flipped from LPS
    assert np.isclose(np.linalg.norm(affine[:3, 2]), 3.0, atol=0.01)
