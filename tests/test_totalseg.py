"""totalseg.FastTotal (one predictor per process) against TotalSegmentator's own call, offline: the stand-in
model in TotalSegmentator's weight-folder layout, random weights, so that every label differs if anything in
the pipeline does."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from ctkit import ct_io, prep, totalseg
from helpers import EXAMPLE, make_masks_cli
from totalseg_standin import make_standin

STAMP = prep.mask_stamp(*prep.totalseg_scheme())
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="TotalSegmentator example data not found")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """TOTALSEG_HOME_DIR with the stand-in for the module's tests (restored afterwards)."""
    home = tmp_path_factory.mktemp("totalseg_home")
    make_standin(home)
    saved = {k: os.environ.get(k) for k in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH")}
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
    yield totalseg.FastTotal("cpu")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def lps(img):
    """The same image stored L, P, S: voxels reversed along i and j, the affine compensating."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(img.shape[:2]) - 1
    return nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1].copy(), img.affine @ flip)


def inputs():
    """What make_masks.py gives TotalSegmentator (the example CT on our RAS 1.5 x 1.5 x 3 grid), that CT
    stored in LPS order, the example at its own 3 mm, and a DICOM series as read (0.98 mm, 2 mm apart)."""
    example = nib.load(EXAMPLE / "example_ct_sm.nii.gz")
    ours = nib.Nifti1Image(*ct_io.preprocess_ct(example.get_fdata(dtype=np.float32), example.affine))
    dicom = nib.Nifti1Image(*ct_io.read_dicom_series(EXAMPLE / "example_ct_dicom"))
    return {"ours_ras": ours, "ours_lps": lps(ours), "example_3mm": example, "dicom_las": dicom}


@pytest.mark.parametrize("name", ["ours_ras", "ours_lps", "example_3mm", "dicom_las"])
def test_labels_equal_totalsegmentators_own_call(standin, name):
    img = inputs()[name]
    ours, theirs = standin(img), totalseg.reference(img, "cpu")
    labels = np.asanyarray(ours.dataobj)
    np.testing.assert_array_equal(labels, np.asanyarray(theirs.dataobj))
    assert labels.dtype == np.uint8 and len(np.unique(labels)) > 10  # random weights: many classes
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    assert [e.get_code() for e in ours.header.extensions] == [e.get_code() for e in theirs.header.extensions]


def test_make_masks_engines_write_identical_masks(standin, tmp_path):
    """The whole make_masks.py path with both engines: a RAS NIfTI, an LPS copy and a DICOM series."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(EXAMPLE / "example_ct_sm.nii.gz", src / "example.nii.gz")
    nib.save(lps(nib.load(EXAMPLE / "example_ct_sm.nii.gz")), src / "flipped.nii.gz")
    shutil.copytree(EXAMPLE / "example_ct_dicom", src / "patient7" / "series3")
    for engine in ("predictor", "totalsegmentator"):
        make_masks_cli(
            "--src",
            src,
            "--dst",
            tmp_path / engine,
            "--region",
            "abdomen",
            "--device",
            "cpu",
            "--engine",
            engine,
        )
    for case in ("example", "flipped", "patient7_series3"):
        masks = [
            nib.load(tmp_path / engine / "mask" / f"{case}.nii")
            for engine in ("predictor", "totalsegmentator")
        ]
        np.testing.assert_array_equal(np.asanyarray(masks[0].dataobj), np.asanyarray(masks[1].dataobj))
        assert prep.nifti_layout(tmp_path / "predictor" / "mask" / f"{case}.nii")["description"] == STAMP
