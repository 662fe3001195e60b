"""Evidence maps (evidence.py): eq. 1's exact decomposition for every backbone and RATIC's heads, and the
localisation scores on hand-made maps."""

import math

import numpy as np
import pytest
import torch

import data
import model as M
from ctkit import evidence

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


def test_upsampled_evidence_is_trilinear():
    maps = torch.arange(8, dtype=torch.float64).reshape(1, 1, 2, 2, 2)
    full = evidence.upsample(maps, (4, 4, 4))
    expected = torch.nn.functional.interpolate(maps, size=(4, 4, 4), mode="trilinear")
    assert torch.equal(full, expected) and full.shape == (1, 1, 4, 4, 4)
