"""Evidence maps (evidence.py): eq. 1's exact decomposition for every backbone and RATIC's heads, and the
localisation scores on hand-made maps."""

import math

import numpy as np
import pytest
import torch

import data
import model as M
from ctkit import evidence, learning_report

CROP = (16, 32, 32)  # every backbone: a (1, 2, 2) feature map


@pytest.mark.parametrize("dataset", ["radchest", "ratic"])
@pytest.mark.parametrize("arch", M.ARCHS)
def test_mean_evidence_plus_bias_is_the_logit(arch, dataset):
    torch.manual_seed(0)
    task = data.make_task(dataset, crop=CROP)
    net = M.build_model(arch, task, seg=True).double().eval()
    x = torch.randn(2, 1, *task.crop, dtype=torch.float64)
    with torch.no_grad():
        logits, maps = net(x), evidence.evidence_maps(net, x)
    assert maps.dtype == torch.float64 and maps.shape[:2] == logits.shape and maps.shape[2:] == (1, 2, 2)
    decomposed = maps.mean((2, 3, 4)) + net.head.bias.detach()
    np.testing.assert_allclose(decomposed.numpy(), logits.numpy(), atol=1e-12)
    assert maps.std() > 0  # the voxels differ: a map, not a constant


def test_localisation_scores_on_a_hand_made_map():
    """On a map at the crop's resolution (grid = crop: upsampling is the identity) the scores are the plain
    definitions."""
    ev = np.zeros((4, 4, 4))
    ev[1, 1, 1], ev[2, 2, 2], ev[3, 3, 3] = 3.0, 1.0, -5.0
    lobe = np.zeros((4, 4, 4), bool)
    lobe[:2, :2, :2] = True
    finding = np.zeros((4, 4, 4), bool)
    finding[1, 1, 1] = True
    s = evidence.localisation_scores(ev, lobe, finding)
    assert s == {"point_region": 1.0, "point_finding": 1.0, "share": 0.75}  # 3 of 3 + 1 positive mass
    s = evidence.localisation_scores(-ev, lobe, finding)  # the peak (5) now lies outside both
    assert s["point_region"] == 0.0 and s["point_finding"] == 0.0 and s["share"] == 0.0
    s = evidence.localisation_scores(ev, lobe, np.zeros_like(finding))  # finding outside the crop
    assert math.isnan(s["point_finding"])
    assert evidence.localisation_scores(np.zeros((2, 2, 2)), lobe[:2, :2, :2])["share"] == 0.0


def test_the_pointing_game_scores_a_border_peak_at_its_cell_not_at_the_crop_edge():
    """A 4x6x6 grid upsampled to 64x96x96 (16 voxels a cell): the peak at border node (0, 2, 5) is flat over
    the 8 voxels next to the border, where np.argmax of the upsampled map takes the crop's edge. Scored at the
    cell's centre (8, 40, 88) instead: in a region holding that cell's inner voxels only."""
    grid = np.zeros((4, 6, 6))
    grid[0, 2, 5] = 1.0
    full = learning_report.upsample(torch.as_tensor(grid)[None, None], (64, 96, 96))[0, 0].numpy()
    edge = np.unravel_index(int(np.argmax(full)), full.shape)
    assert edge == (0, 39, 88)  # the old score's voxel: on the crop's first slice, 8 from the cell's centre
    region = np.zeros((64, 96, 96), bool)
    region[4:12, 36:44, 84:92] = True  # around the cell's centre, away from the crop's edge
    finding = np.zeros_like(region)
    finding[8, 40, 88] = True
    s = evidence.localisation_scores(grid, region, finding)
    assert s["point_region"] == 1.0 and s["point_finding"] == 1.0
    assert 0 < s["share"] < 1 and math.isclose(s["share"], full[region].sum() / full.sum())


def test_upsampled_evidence_is_trilinear():
    maps = torch.arange(8, dtype=torch.float64).reshape(1, 1, 2, 2, 2)
    full = learning_report.upsample(maps, (4, 4, 4))
    expected = torch.nn.functional.interpolate(maps, size=(4, 4, 4), mode="trilinear")
    assert torch.equal(full, expected) and full.shape == (1, 1, 4, 4, 4)


@pytest.mark.parametrize("arch", M.ARCHS)
def test_explain_and_features_of_one_ct_for_every_backbone(arch, tmp_path):
    """tools/predict.py --explain / --features on a phantom written as NIfTI, for a seg-trained checkpoint."""
    import nibabel as nib

    import predict
    from ctkit import synthetic
    from helpers import train_cli

    flags = f"--model {arch} --seg --epochs 1 --max-steps 1 -b 2 -j 0 --crop 16 32 32 --synthetic-cases 2 2 2"
    train_cli(*flags.split(), "--output-dir", tmp_path / "run")
    ct, *_ = synthetic.make_phantom(np.random.default_rng(0), (20, 40, 40))
    nib.save(nib.Nifti1Image(ct.transpose(2, 1, 0), np.diag([1.5, 1.5, 3.0, 1])), tmp_path / "scan.nii.gz")
    probs = predict.predict(
        str(tmp_path / "scan.nii.gz"),
        str(tmp_path / "run" / "checkpoint.pth"),
        explain=str(tmp_path / "explain"),
        features=str(tmp_path / "f.npz"),
    )
    saved = np.load(tmp_path / "f.npz")
    assert saved["features"].shape == ((512,) if arch == "r3d" else (768,))
    np.testing.assert_allclose(saved["probabilities"], list(probs.values()), rtol=1e-6)
    sheets = sorted((tmp_path / "explain").glob("evidence_*.png"))
    assert len(sheets) == 5 and all(p.stat().st_size > 10_000 for p in sheets)


def test_the_body_a_sheet_looks_in_is_the_tissue_with_the_lungs_filled():
    """A chest slab: air around, a body ring of 40 HU holding a lung of -850 HU. The body is the ring and the
    lung inside it; the strongest evidence in it is the lung's, not the larger value in the air's corner."""
    import predict

    z, y, x = np.ogrid[:6, :20, :20]
    radius = np.hypot(y - 10, x - 10) + 0 * z  # (6, 20, 20)
    crop = np.where(radius < 5, -850, np.where(radius < 8, 40, -1024)).astype(np.int16)
    body = predict.body_mask(crop)
    np.testing.assert_array_equal(body, radius < 8)
    evidence_map = np.zeros(crop.shape, np.float32)
    evidence_map[0, 0, 0], evidence_map[3, 9, 12] = 5.0, 1.0  # air at the corner; the lung
    assert predict.peak(evidence_map, body) == (3, 9, 12)
    assert predict.peak(evidence_map, np.ones_like(body)) == (0, 0, 0)  # without the body: the air's corner
    assert predict.body_mask(np.full(crop.shape, -1024, np.int16)).all()  # no body at all: the whole crop


def test_anatomy_shares_of_a_hand_made_map():
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[0] = 1  # structure 1: the first slice; structure 2: one voxel of the second
    mask[1, 0, 0] = 2
    e = np.zeros((2, 2, 2, 2))
    e[0, 0] = 1.0  # output 0: 4 units in structure 1
    e[0, 1, 0, 0] = 2.0  # 2 units in structure 2
    e[0, 1, 1, 1] = 2.0  # 2 units outside
    e[0, 1, 0, 1] = -5.0  # negative evidence does not count
    shares = evidence.anatomy_shares(e, mask, 2)  # output 1: no positive evidence at all
    np.testing.assert_allclose(shares, [[0.5, 0.25, 0.25], [0, 0, 0]])


@pytest.mark.parametrize("files", [False, True], ids=["phantoms-in-memory", "make_masks-files"])
def test_evidence_by_anatomy_of_a_run(files, tmp_path, capsys):
    import json

    import evaluate
    from helpers import prepared_synthetic, train_cli

    source = (
        ["--data-path", prepared_synthetic(tmp_path / "syn")] if files else ["--synthetic-cases", 4, 2, 4]
    )
    small = ["-b", "2", "-j", "0", "--epochs", "1", "--crop", "16", "32", "32"]
    train_cli(*source, *small, "--output-dir", tmp_path / "run")  # w/o seg
    evaluate.main(evaluate.get_args_parser().parse_args([str(tmp_path / "run"), "--evidence"]))
    table = json.loads((tmp_path / "run" / "evidence_by_anatomy_test.json").read_text())
    assert list(table) == list(data.make_task("synthetic").classes)
    for row in table.values():
        shares = [v for k, v in row.items() if k != "positives"]
        assert len(shares) == 7  # 5 lobes, the heart, outside
        if row["positives"]:  # a mean over cases of shares that add up to 1 (or 0 without positive evidence)
            assert all(0 <= v <= 1 for v in shares) and sum(shares) <= 1 + 1e-9
    assert "share of the positive evidence in each structure" in capsys.readouterr().out
