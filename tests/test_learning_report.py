"""The seg head's learning report (learning_report.py): floors with known answers, a head that outputs the
floor reports exactly the floor, and a barely trained head is reported at (or above) the floor."""

import math

import numpy as np
import torch
import torch.nn as nn

import data
import evaluate
from ctkit import inference
from ctkit import learning_report as lr
from helpers import train_cli

STRUCTURES = ("a", "b")  # labels 1, 2; 0 is background


def dataset_of(masks):
    """A CTDataset whose crops are the masks themselves (pad = crop = their shape)."""
    shape = masks[0].shape
    volumes = [(np.zeros(shape, np.int16), m) for m in masks]
    labels = np.zeros((len(masks), 1), np.float32)
    ids = [f"c{i}" for i in range(len(masks))]
    return data.CTDataset(ids, volumes, labels, shape, shape, train=False, with_mask=True)


def masks_of(n, shape=(4, 6, 6), seed=0):
    """Masks with a fixed layout plus per-case noise: label 1 in the left half, 2 in a random block."""
    rng, masks = np.random.default_rng(seed), []
    for _ in range(n):
        m = np.zeros(shape, np.uint8)
        m[:, :, : shape[2] // 2] = 1
        z, y = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 2)
        m[z : z + 2, y : y + 3, shape[2] // 2 :] = 2
        masks.append(m)
    return masks


def test_full_resolution_floor_is_the_smoothed_label_frequency():
    train, test = masks_of(2, seed=1), masks_of(1, seed=2)
    floor = lr.floors(data.centre_masks(dataset_of(train)), (2, 3, 3), 3)
    maps, n = floor["maps"], floor["train_masks"]
    assert (
        n == 2
        and floor["lungs"] == ()
        and set(maps) == {"average anatomy, full resolution", "average anatomy, head's grid"}
    )
    counts = np.stack([sum((m == c).astype(float) for m in train) for c in range(3)])
    expected_log_p = np.log((counts + lr.SMOOTHING) / (2 + 3 * lr.SMOOTHING))
    np.testing.assert_allclose(maps["average anatomy, full resolution"].numpy(), expected_log_p, rtol=1e-6)
    row = lr.fixed_map_row(maps["average anatomy, full resolution"], test, STRUCTURES)
    t = test[0]
    ce = -np.mean(np.take_along_axis(expected_log_p, t[None].astype(int), 0))
    assert math.isclose(row["ce"], ce, rel_tol=1e-6)
    pred = expected_log_p.argmax(0)
    dice_a = 2 * np.sum((pred == 1) & (t == 1)) / (np.sum(pred == 1) + np.sum(t == 1))
    assert math.isclose(row["dice"]["a"], dice_a)


def test_grid_fit_of_a_spatially_constant_distribution_is_its_entropy():
    """Every voxel 70 % background, 30 % label 1: the optimum is that distribution everywhere, CE = H(p)."""
    counts = np.zeros((1, 2, 8, 8, 8))
    counts[0, 0], counts[0, 1] = 7, 3
    logits = lr.fit_grid_logits(counts, (2, 2, 2))
    p = torch.softmax(logits, 1)[0, :, 0, 0, 0]
    np.testing.assert_allclose(p.numpy(), [0.7, 0.3], atol=1e-4)


class FixedMapHead(nn.Module):
    """A 'model' whose seg head outputs the same grid logits for every case (and a constant classifier)."""

    def __init__(self, grid_logits):
        super().__init__()
        self.logits = nn.Parameter(grid_logits[None].clone())

    def backbone(self, x):
        return x.new_zeros(x.shape[0], 1, *self.logits.shape[2:])

    def seg_head(self, features):
        return self.logits.expand(features.shape[0], *self.logits.shape[1:])


def test_a_head_that_outputs_the_grid_floor_reports_exactly_the_floor():
    train_set, test_set = dataset_of(masks_of(12, seed=3)), dataset_of(masks_of(5, seed=4))
    grid = (2, 3, 3)
    counts = np.stack([sum((m == c).astype(float) for m in data.centre_masks(train_set)) for c in range(3)])
    grid_logits = lr.fit_grid_logits(counts[None], grid)[0]
    head = FixedMapHead(grid_logits)
    task = data.Task(
        "synthetic", "multilabel", "chest", ("x",), STRUCTURES, (-1000, 200), (4, 6, 6), (4, 6, 6)
    )
    loader = torch.utils.data.DataLoader(test_set, 2)
    ce, dice_counts = inference.seg_split(head, loader, task)
    floors, test_masks = lr.floors(data.centre_masks(train_set), grid, 3), list(data.centre_masks(test_set))
    report = lr.learning_report(
        (float(ce.sum()), dice_counts), floors, test_masks, grid, STRUCTURES, bound=True
    )
    rows = report["rows"]
    head_row, floor = rows["seg head"], rows["average anatomy, head's grid"]
    assert math.isclose(head_row["ce"], floor["ce"], rel_tol=1e-5)
    assert head_row["dice"] == floor["dice"]
    bound = rows["best per-case map, head's grid (bound)"]
    assert bound["ce"] < floor["ce"] and bound["dice"]["mean"] >= floor["dice"]["mean"]  # case-specific
    assert report["cases"] == 5 and report["train_masks"] == 12 and report["grid"] == list(grid)


LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "heart",
)


def lungs_at(shift, fissure=0.5, shape=(8, 8, 16)):
    """A chest-scheme mask: two 4x4x4 lungs, shifted by `shift` voxels along y; in each, the upper lobe above
    `fissure` of the lung's height (the right lung's middle lobe: its anterior half of that)."""
    mask = np.zeros(shape, np.uint8)
    top = int(4 * fissure)
    for x0, upper, lower in ((2, 1, 2), (10, 3, 5)):
        lung = mask[2:6, shift : shift + 4, x0 : x0 + 4]
        lung[:], lung[top:] = lower, upper  # z grows upwards: the upper lobe is the top of the box
        if upper == 3:
            lung[top:, 2:] = 4
    return mask


def test_the_lungs_only_map_knows_each_cases_lungs_but_not_its_lobes():
    """Training lungs whose lobes sit at the same place of the lung's box but move in the crop: fitted into a
    test case's lungs, the map finds its lobes exactly (Dice 1), where the average anatomy cannot; with the
    test case's fissure elsewhere in its lung it does not."""
    train = [lungs_at(shift) for shift in (0, 1, 2, 3, 4)]
    floor = lr.floors(train, (2, 2, 2), 7, lungs=lr.lungs_of(LOBES))
    assert floor["lungs"] == ((1, 2), (3, 4, 5)) and lr.lungs_of(LOBES[2:]) == ((1, 2, 3),)
    same, moved = lungs_at(2), lungs_at(2, fissure=0.25)
    fitted = lr.lungs_only_row(floor, [same], LOBES)
    average = lr.fixed_map_row(floor["maps"]["average anatomy, full resolution"], [same], LOBES)
    assert all(fitted["dice"][name] == 1.0 for name in LOBES[:5]) and fitted["ce"] < average["ce"]
    assert lr.lungs_only_row(floor, [moved], LOBES)["dice"]["lung_upper_lobe_left"] < 1.0


def test_a_head_trained_for_a_few_steps_is_reported_at_the_floor(tmp_path, capsys):
    flags = "--seg --synthetic-cases 6 2 3 -b 2 -j 0 --epochs 1 --max-steps 3".split()
    train_cli(*flags, "--output-dir", tmp_path)
    report = evaluate.utils.read_json(tmp_path / "seg_report_test.json")
    rows = report["rows"]
    head, floor = rows["seg head"], rows["average anatomy, head's grid"]
    bound = rows["best per-case map, head's grid (bound)"]
    assert report["grid"] == [2, 3, 3] and report["cases"] == 3
    assert head["ce"] > 0.95 * floor["ce"]  # no better than where organs usually lie
    lungs = rows["average lobes in each case's lungs"]  # the phantoms' chest structures: both lungs' lobes
    assert lungs["ce"] < rows["average anatomy, full resolution"]["ce"]
    assert bound["ce"] <= floor["ce"] + 1e-6
    printed = capsys.readouterr().out
    assert "average anatomy, head's grid" in printed and "seg head" in printed
