"""The anatomy scores of the positive control (docs/study/anatomy_scores.py): a perfect nodule detector's
case scores with three kinds of lobe knowledge, on hand-made volumes with known answers and on a few
phantoms of each variant."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "study"))
import anatomy_scores as A  # noqa: E402

from ctkit.learning_report import LUNG_BINS, lung_bins  # noqa: E402


def two_lungs():
    """An (8, 8, 16) mask: left lung x 0-7 (lobe 1 above z 4, lobe 2 below), right lung x 8-15 (lobe 3 above,
    lobe 5 below); and its CT: lung at -850 with a 2x2x2 nodule in lobe 3 and a 1-voxel vessel in lobe 2."""
    mask = np.zeros((8, 8, 16), np.uint8)
    mask[4:, :, :8], mask[:4, :, :8], mask[4:, :, 8:], mask[:4, :, 8:] = 1, 2, 3, 5
    ct = np.full(mask.shape, -850, np.int16)
    ct[4:6, 2:4, 10:12] = 40
    ct[1, 1, 1] = -50
    return ct, mask


def test_lung_bins_place_each_voxel_in_its_own_lungs_box():
    _, mask = two_lungs()
    mask[:, :, 6:8] = 0  # the left lung now spans x 0-5: its box is 6 wide, the right one 8
    assert A.LUNGS == ((1, 2), (3, 4, 5))
    bins = lung_bins(mask, A.LUNGS)
    assert np.all(bins[:, :, 6:8] == -1)

    def last(n):  # the bin of the last of n voxels over LUNG_BINS bins
        return (n - 1) * LUNG_BINS // n

    assert bins[0, 0, 0].tolist() == [0, 0, 0] and bins[7, 7, 5].tolist() == [last(8), last(8), last(6)]
    assert bins[7, 7, 15].tolist() == [last(8)] * 3 and bins[0, 0, 8].tolist() == [0, 0, 0]
    assert bins[4, 4, 3].tolist() == [4 * LUNG_BINS // 8, 4 * LUNG_BINS // 8, 3 * LUNG_BINS // 6]


def test_the_detector_and_the_three_scores_on_a_hand_made_case():
    ct, mask = two_lungs()
    found = A.nodules(ct, mask, min_voxels=4)
    assert len(found) == 1 and len(found[0]) == 8  # the nodule; the vessel is too small
    position = np.zeros((7, *mask.shape))
    position[3], position[5] = 0.25, 0.75  # a map that gives lobe 3 a quarter everywhere
    lung = np.zeros((7, LUNG_BINS, LUNG_BINS, LUNG_BINS))
    lung[3, LUNG_BINS // 2 :] = 0.6  # the upper half of each lung's box: lobe 3 in 60 % of training lungs
    scores = A.case_scores(mask, found, 3, (position, lung))
    np.testing.assert_allclose(scores, [0.25, 0.6, 1.0])
    np.testing.assert_allclose(A.case_scores(mask, found, 2, (position, lung)), [0, 0, 0])
    np.testing.assert_allclose(A.case_scores(mask, [], 3, (position, lung)), [0, 0, 0])


def test_training_maps_are_label_fractions():
    _, mask = two_lungs()
    other = mask.copy()
    other[other == 3] = 5  # a right lung all lower lobe
    position, lung = A.training_maps([mask, other])
    assert position.shape == (7, *mask.shape) and lung.shape == (7, LUNG_BINS, LUNG_BINS, LUNG_BINS)
    np.testing.assert_allclose(position.sum(0), 1.0)
    assert position[3, 6, 0, 12] == 0.5 and position[5, 6, 0, 12] == 0.5 and position[1, 6, 0, 0] == 1.0
    top = lung[:, 7 * LUNG_BINS // 8, 0, 0]  # the top voxels of each lung's box: lobe 1 left, 3 or 5 right
    assert top[1] == 0.5 and top[3] == 0.25 and top[5] == 0.25


def test_true_lobes_separate_the_classes_on_a_few_phantoms_of_each_variant():
    for variant in ("fissures", "default"):
        rows, aucs = A.anatomy_scores(variant, (32, 48, 48), 8, 16)
        assert len(rows) == 2 * 16 and set(aucs) == {"nodule_right_upper_lobe", "nodule_left_lower_lobe"}
        for name, auc in aucs.items():
            assert auc["lobes"] == 1.0 and 0 <= auc["position"] <= 1 and 0 <= auc["lung"] <= 1
            if variant == "fissures":  # nodule and decoy on either side of one fissure (a vessel may touch)
                lobes = {y: [float(r[5]) for r in rows if r[1] == name and r[2] == y] for y in (0, 1)}
                assert lobes[1] and min(lobes[1]) > 0.95 and lobes[0] and max(lobes[0]) < 0.05
