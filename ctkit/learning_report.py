"""The seg head's learning report: did the auxiliary head learn each case's anatomy, or only where organs
usually lie? (docs/learning_report.md)

The head's cross-entropy (eq. 3 on the evaluated centre crops) and Dice are set beside floors computed from
the training masks only (their centre crops, the frame of the evaluated crops):
- average anatomy, full resolution: one per-voxel label distribution shared by all cases (label frequencies,
  smoothed by SMOOTHING): the best any predictor that ignores the case can do;
- average anatomy at the head's grid: one fixed logit map on the head's (d, h, w) grid, upsampled trilinearly
  as the head's logits are, fitted to the training masks: the best a head that ignores the case can do;
where the structures hold both lungs' lobes, average lobes in each case's lungs: inside each lung of the
evaluated mask the training lungs' lobe frequencies at the same place of the lung's bounding box, outside
them the average anatomy: a map that knows each case's lungs but not its lobes (a head at this row may have
learnt only the lungs' outline);
and, where asked (the phantoms), the best per-case map at the head's grid: a logit map fitted to each
evaluated mask itself, the most any 1x1x1 head on that grid could express (an upper bound, not a floor).
A head at the grid floor has learnt nothing about the individual case.
"""

import numpy as np
import torch
import torch.nn.functional as F

SMOOTHING = 0.5  # added to every label count of the average anatomy: no voxel gets probability 0
MAX_TRAIN_MASKS = 1000  # the floors' training masks (evenly spaced over the split beyond this)
BOUND_BATCH = 8  # evaluated masks fitted together for the per-case bound
BOUND_CASES = 40  # the per-case bound on this many evaluated cases (evenly spaced): ~5 s each at 64x96x96
FIT_STRIDE = 2  # the grid maps are fitted on every 2nd voxel per axis (100x faster), scored on all
LUNGS = (
    ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
)
LUNG_BINS = 16  # positions in a lung: its bounding box in this many bins per axis


def lungs_of(structures):
    """The seg classes (1..S) of each lung whose lobes are all structures of the task; () if none is."""
    label = {name: i for i, name in enumerate(structures, start=1)}
    return tuple(tuple(label[n] for n in lung) for lung in LUNGS if all(n in label for n in lung))


def lung_bins(mask, lungs):
    """Per voxel of each lung (a tuple of labels of `mask`), its position relative to that lung's bounding
    box, LUNG_BINS per axis: (D, H, W, 3) int64, -1 outside the lungs."""
    bins = np.full((*mask.shape, 3), -1, np.int64)
    for lung in lungs:
        voxels = np.isin(mask, lung)
        if voxels.any():
            where = np.argwhere(voxels)
            low, high = where.min(0), where.max(0) + 1
            bins[voxels] = np.minimum((where - low) * LUNG_BINS // (high - low), LUNG_BINS - 1)
    return bins


def interpolation_matrix(n, size, stride=1):
    """(n, ceil(size / stride)): F.interpolate's linear weights (align_corners=False) from n points to `size`,
    at every stride-th output; trilinear upsampling is these three applied one axis after another."""
    return F.interpolate(torch.eye(n)[None], size=size, mode="linear")[0, :, ::stride]


def fit_grid_logits(counts, grid, iterations=60, stride=FIT_STRIDE, device="cpu"):
    """Logits L (B, S, d, h, w) minimising sum_v sum_c counts[b, c, v] * -log softmax(up(L))[c, v] / the
    total count, up = trilinear upsampling to the counts' size (B, S, D, H, W), as the seg head's. The sum
    runs over every stride-th voxel per axis (512 per grid cell at 16x upsampling and stride 2): a map fitted
    so is still a map a head could output, its CE on all voxels at most ~3 % above the full fit's (measured
    on 8 phantoms at 64x96x96: 0.0525 vs 0.0509). L-BFGS from the log of the pooled label frequencies."""
    counts = torch.as_tensor(counts, dtype=torch.float32, device=device)
    if any(n < 8 * g for g, n in zip(grid, counts.shape[2:])):  # < 4 samples per cell and axis: use all
        stride = 1
    axes = [interpolation_matrix(g, n, stride).to(device) for g, n in zip(grid, counts.shape[2:])]
    counts = counts[:, :, ::stride, ::stride, ::stride]
    start = F.adaptive_avg_pool3d(counts / counts.sum(1, keepdim=True).clamp(min=1), grid)
    logits = torch.log(start + 1e-3).requires_grad_()
    optimizer = torch.optim.LBFGS([logits], max_iter=iterations, line_search_fn="strong_wolfe")
    total = counts.sum()

    def closure():
        optimizer.zero_grad()
        full = torch.einsum("bcdhw,dD,hH,wW->bcDHW", logits, *axes)  # (B, S, D, H, W) / stride
        loss = -(counts * F.log_softmax(full, 1)).sum() / total
        loss.backward()
        return loss

    optimizer.step(closure)
    return logits.detach()


def dice_counts(pred, target, num_labels):
    """Per case and foreground structure: (intersection, predicted, true) voxels, (B, num_labels - 1, 3)."""
    counts = []
    for label in range(1, num_labels):
        p, t = pred == label, target == label
        counts.append(torch.stack([(p & t).sum((1, 2, 3)), p.sum((1, 2, 3)), t.sum((1, 2, 3))], 1))
    return torch.stack(counts, 1)


def upsample(logits, size):
    """(B, C, d, h, w) -> (B, C, *size), trilinear: how eq. 3 brings the seg head's logits to the crop, and
    how every map the reports compare with them (fitted floors, evidence maps) is brought there too."""
    return F.interpolate(logits, size=tuple(size), mode="trilinear")


def score(log_probs, mask, num_labels):
    """(CE summed over voxels, Dice counts (num_labels - 1, 3): intersection, predicted, true) of one mask
    under full-resolution log-probabilities (S, D, H, W)."""
    target = torch.as_tensor(mask, dtype=torch.long, device=log_probs.device)
    ce = -log_probs.gather(0, target[None]).sum()
    counts = dice_counts(log_probs.argmax(0)[None], target[None], num_labels)[0]
    return float(ce), counts.cpu().numpy().astype(np.int64)


def structure_dice(dice_counts, structures):
    """Per structure, the mean per-case Dice over the cases that contain it (nan if none), and "mean" over the
    structures that have one; dice_counts (N, S, 3): intersection, predicted, true voxels."""
    counts = np.asarray(dice_counts, dtype=np.float64)
    dice = {}
    for s, name in enumerate(structures):
        present = counts[:, s, 2] > 0
        values = 2 * counts[present, s, 0] / (counts[present, s, 1] + counts[present, s, 2])
        dice[name] = float(values.mean()) if present.any() else float("nan")
    known = [v for v in dice.values() if not np.isnan(v)]
    dice["mean"] = float(np.mean(known)) if known else float("nan")
    return dice


def dice_summary(counts, structures):
    """Mean per-case Dice of each structure over the cases that contain it; counts (N, S, 3)."""
    present = (np.asarray(counts)[:, :, 2] > 0).sum(0)
    dice = structure_dice(counts, structures)
    summary = {name: {"dice": dice[name], "cases": int(n)} for name, n in zip(structures, present)}
    summary["mean"] = {"dice": dice["mean"], "cases": len(counts)}
    return summary


def summarise(ce_sum, voxels, dice_counts, structures):
    """{"ce": mean per voxel, "dice": structure_dice}."""
    return {"ce": ce_sum / voxels, "dice": structure_dice(dice_counts, structures)}


def fixed_map_row(log_probs, masks, structures):
    """One map for every case (S, D, H, W) scored on the masks."""
    ce, counts, voxels = 0.0, [], 0
    for mask in masks:
        c, d = score(log_probs, mask, len(structures) + 1)
        ce, voxels = ce + c, voxels + mask.size
        counts.append(d)
    return summarise(ce, voxels, counts, structures)


def per_case_bound_row(masks, grid, structures, device="cpu"):
    """The best per-case map at the head's grid, fitted to each mask (BOUND_BATCH masks at a time)."""
    ce, counts, voxels, num_labels = 0.0, [], 0, len(structures) + 1
    for start in range(0, len(masks), BOUND_BATCH):
        batch = masks[start : start + BOUND_BATCH]
        one_hot = np.stack([np.stack([m == label for label in range(num_labels)]) for m in batch])
        logits = fit_grid_logits(one_hot.astype(np.float32), grid, device=device)
        for mask, case_logits in zip(batch, logits):
            full = upsample(case_logits[None], mask.shape)[0]
            c, d = score(F.log_softmax(full, 0), mask, num_labels)
            ce, voxels = ce + c, voxels + mask.size
            counts.append(d)
    return summarise(ce, voxels, counts, structures)


def floors(train_masks, grid, num_labels, device="cpu", lungs=()):
    """The floors from the training split's centre-crop masks (an iterable of (D, H, W), at most
    MAX_TRAIN_MASKS of them), in one pass: {"maps": the fixed maps' full-resolution log-probabilities
    (S, D, H, W) by row name, "train_masks": how many, "lungs": lungs_of(...), "lung_counts": (S, LUNG_BINS,
    LUNG_BINS, LUNG_BINS) label counts by position in the lungs, "average": the average anatomy's
    probabilities}."""
    counts, lung_counts, n_train = 0.0, np.zeros((num_labels, *(LUNG_BINS,) * 3)), 0
    for mask in train_masks:
        counts = counts + np.stack([mask == label for label in range(num_labels)])
        bins = lung_bins(mask, lungs)
        inside = bins[..., 0] >= 0
        np.add.at(lung_counts, (mask[inside], *bins[inside].T), 1.0)
        n_train += 1
    average = (counts + SMOOTHING) / (n_train + SMOOTHING * num_labels)
    grid_logits = fit_grid_logits(counts[None], grid, device=device)[0]
    grid_map = upsample(grid_logits[None], counts.shape[1:])[0]
    maps = {
        "average anatomy, full resolution": torch.as_tensor(
            np.log(average), dtype=torch.float32, device=device
        ),
        "average anatomy, head's grid": F.log_softmax(grid_map, 0),
    }
    return dict(maps=maps, train_masks=n_train, lungs=lungs, lung_counts=lung_counts, average=average)


def lungs_only_row(floor, masks, structures):
    """Average lobes in each case's lungs: inside each lung of an evaluated mask, P(label | position in the
    lung's box) from the training lungs (smoothed, over that lung's labels only); outside, the average
    anatomy without the lungs' labels. It knows the case's lungs, not its fissures."""
    lungs, counts, num_labels = floor["lungs"], floor["lung_counts"], len(structures) + 1
    outside = floor["average"].copy()
    outside[[label for lung in lungs for label in lung]] = 0
    outside /= outside.sum(0, keepdims=True)
    ce, dice, voxels = 0.0, [], 0
    for mask in masks:
        probs, bins = outside.copy(), lung_bins(mask, lungs)
        for lung in lungs:
            inside = np.isin(mask, lung)
            in_lung = np.zeros((num_labels, 1))
            in_lung[list(lung)] = 1
            frequencies = (
                counts[(slice(None), *bins[inside].T)] + SMOOTHING
            ) * in_lung  # (S, voxels of the lung)
            probs[:, inside] = frequencies / frequencies.sum(0, keepdims=True)
        c, d = score(torch.log(torch.as_tensor(probs, dtype=torch.float32)), mask, num_labels)
        ce, voxels = ce + c, voxels + mask.size
        dice.append(d)
    return summarise(ce, voxels, dice, structures)


def learning_report(head, floor, masks, grid, structures, bound=False, device="cpu"):
    """The report of one evaluated split. head: (CE summed over voxels, Dice counts (N, S, 3)) of the seg
    head on the split's centre crops, whose masks are `masks` (a list of (D, H, W)); floor: floors();
    grid: the head's (d, h, w). A JSON-ready dict."""
    voxels = sum(m.size for m in masks)
    rows = {"seg head": summarise(head[0], voxels, head[1], structures)}
    rows.update(
        {name: fixed_map_row(log_probs, masks, structures) for name, log_probs in floor["maps"].items()}
    )
    if floor["lungs"]:
        rows["average lobes in each case's lungs"] = lungs_only_row(floor, masks, structures)
    n_train = floor["train_masks"]
    report = dict(grid=list(grid), train_masks=n_train, cases=len(masks), smoothing=SMOOTHING, rows=rows)
    if bound:  # an upper bound: fitted to each mask itself, on a subset of the cases (cost)
        picks = np.linspace(0, len(masks) - 1, min(BOUND_CASES, len(masks))).round().astype(int)
        some = [masks[i] for i in picks]
        rows["best per-case map, head's grid (bound)"] = per_case_bound_row(some, grid, structures, device)
        report["bound_cases"] = len(some)
    return report


def short_name(structure):
    """A column label: 'lung_upper_lobe_left' -> 'upper_left'."""
    return structure.replace("lung_", "").replace("_lobe", "")[:12]


def format_report(report, split):
    """The report as the lines printed under the evaluation table."""
    names = list(next(iter(report["rows"].values()))["dice"])
    grid = "x".join(str(g) for g in report["grid"])
    bound = f"; bound on {report['bound_cases']} of them" if "bound_cases" in report else ""
    lines = [
        f"segmentation head learning report, {split} ({report['cases']} cases{bound}; floors from "
        f"{report['train_masks']} training masks; head grid {grid}): cross-entropy and Dice",
        f"{'':<40}{'CE':>7}" + "".join(f"{short_name(n):>13}" for n in names),
    ]
    for label, row in report["rows"].items():
        lines.append(f"{label:<40}{row['ce']:7.3f}" + "".join(f"{row['dice'][n]:13.3f}" for n in names))
    return "\n".join(lines)
