"""The phantoms at any geometry (synthetic.py): the default ones keep their bytes, a larger pad box gives the
same cases at a finer resolution, the findings map marks the localised findings, parallel = serial."""

import hashlib

import numpy as np

import data
import train
from ctkit import synthetic

LOBE_OF = {k + 1: lobe for k, (_, lobe) in enumerate(synthetic.LOCALISED)}


def digest(array):
    return hashlib.sha1(array.tobytes()).hexdigest()[:12]


def test_default_phantoms_keep_their_bytes():
    """The first training phantom as every earlier run saw it (recorded before phantoms followed the box)."""
    _, volumes, labels = synthetic.synthetic_split("train", 2)
    assert volumes[0][0].shape == (43, 61, 60) and labels[0].tolist() == [1, 1, 0, 0, 0]
    assert digest(volumes[0][0]) == "b9b7833ad4ba" and digest(volumes[0][1]) == "4642feb4a967"
    assert digest(volumes[1][0]) == "eae4ac40eaa5" and digest(volumes[1][1]) == "5744925c523a"


def test_a_twice_larger_box_gives_the_same_cases_at_twice_the_resolution():
    small = list(synthetic.phantoms("val", 4))
    large = list(synthetic.phantoms("val", 4, pad=(80, 120, 120)))
    for (ct, mask, labels, _), (ct2, mask2, labels2, findings2) in zip(small, large):
        assert tuple(2 * s for s in ct.shape) == ct2.shape == mask2.shape == findings2.shape
        np.testing.assert_array_equal(labels, labels2)  # the same findings
        for label in range(1, 7):  # every lobe and the heart: 8x the voxels, the centroid at twice the index
            a, b = np.argwhere(mask == label), np.argwhere(mask2 == label)
            if len(a) < 50:  # an effusion can leave a sliver of a lobe
                continue
            assert 6.5 < len(b) / len(a) < 9.5, label
            np.testing.assert_allclose(b.mean(0), 2 * a.mean(0) + 0.5, atol=2.5)


def test_the_findings_map_marks_each_localised_nodule_in_its_lobe():
    seen = 0
    for ct, mask, labels, findings in synthetic.phantoms("test", 12, pad=(80, 120, 120)):
        for finding, lobe in LOBE_OF.items():
            voxels = findings == finding
            assert voxels.any() == bool(labels[finding - 1])  # present exactly when labelled
            if voxels.any():
                seen += 1
                assert np.mean(mask[voxels] == lobe) > 0.5  # centred in its lobe
                assert np.all(ct[voxels] > -300)  # the nodule's own tissue (40 HU + noise)
                radius = (3 * voxels.sum() / (4 * np.pi)) ** (1 / 3)
                low, high = (r * min(ct.shape[1:]) / 60 for r in synthetic.NODULES["radius"])  # in voxels
                assert 0.9 * low < radius < 1.1 * high
    assert seen >= 4


def test_parallel_phantoms_equal_serial_ones(monkeypatch):
    serial = list(synthetic.phantoms("train", 3, pad=(24, 36, 36)))
    monkeypatch.setattr(synthetic, "PARALLEL_VOXELS", 0)
    parallel = list(synthetic.phantoms("train", 3, pad=(24, 36, 36)))
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_train_crop_sizes_the_phantoms():
    args = train.get_args_parser().parse_args("--crop 48 72 72 --synthetic-cases 2 2 2".split())
    task = data.make_task(args.dataset, args.crop, args.pad)
    settings, _ = train.resolve(args, task.region, "cpu")
    splits = data.build_datasets(task, settings.source(), settings.seed, with_mask=True)
    assert task.pad == (60, 90, 90)
    for dataset in splits.values():
        for ct, mask in dataset.volumes:
            assert all(abs(s - p) <= 6 for s, p in zip(ct.shape, task.pad)) and ct.shape == mask.shape


def boundary(mask, lobes_a, lobes_b):
    """Voxels of lobes_a with a 6-neighbour in lobes_b."""
    a, b = np.isin(mask, lobes_a), np.isin(mask, lobes_b)
    near = np.zeros_like(b)
    for axis in range(3):
        for shift in (1, -1):
            near |= np.roll(b, shift, axis)
    return a & near


def test_the_fissures_variant_draws_visible_varying_fissures_and_nodules_against_them():
    """Every nodule of the variant fills only its own lobe and touches the fissure to the lobe across; every
    negative case holds a decoy across that fissure; the fissures are brighter than the lung, and the lobes'
    sizes vary far more than in the default phantoms."""
    fissures = list(synthetic.phantoms("test", 16, variant="fissures"))
    default = list(synthetic.phantoms("test", 16))
    for ct, mask, labels, findings in fissures:
        lung = (mask >= 1) & (mask <= 5)
        sheet = boundary(mask, (1,), (2,)) | boundary(mask, (2,), (1,))
        bright = ct > -780  # lung -850 with noise SD 20; fissures -700
        air = ct < -300  # no nodule or vessel
        assert bright[sheet & air].mean() > 0.3 and bright[lung & ~sheet & air].mean() < 0.05
        for k, (_, lobe) in enumerate(synthetic.LOCALISED):
            across = synthetic.NEIGHBOURS[lobe]
            voxels = findings == k + 1
            assert voxels.any() == bool(labels[k])
            tissue = (ct > -300) & lung
            if labels[k]:
                assert np.all(mask[voxels] == lobe) and (voxels & boundary(mask, (lobe,), across)).any()
                assert not (tissue & boundary(mask, across, (lobe,))).sum() > 0.5 * voxels.sum()  # no decoy
            else:  # a decoy (decoy probability 1): nodule tissue in the lobes across, against the fissure
                assert synthetic.FISSURES["decoy"] == 1.0
                assert (tissue & boundary(mask, across, (lobe,))).sum() > 10

    def lower_share(phantoms):  # the left lower lobe's share of the left lung, per case
        return np.array([np.mean(m[np.isin(m, (1, 2))] == 2) for _, m, *_ in phantoms])

    assert lower_share(fissures).std() > 2 * lower_share(default).std()  # 0.17 vs 0.06
