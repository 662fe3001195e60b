"""Where a classifier's evidence lies, exactly (paper §2.2, eq. 1).

Eq. 1 is global average pooling of the last feature map followed by a linear layer, so the linear layer
applied at every feature voxel gives, per output k, a map E_k (B, K, d, h, w) whose mean over the voxels
plus the bias is the logit: logit_k = mean_v E_k(v) + b_k. No gradients and no approximation, the same for
all three backbones (each returns (B, C, d, h, w)) and for RATIC's heads (output by output). Positive values
raise the logit, negative ones lower it.

`evidence_maps` is the one implementation; `localisation_scores` scores one map against a region (a
structure of a mask) and the finding's own voxels where they are known (the synthetic phantoms);
`anatomy_shares` splits a map's positive evidence among the structures of a mask, and `evidence_by_anatomy`
/ `format_evidence` tabulate those shares per finding (evaluate.py --evidence).
"""

import numpy as np
import torch

from ctkit.labels import ABBREVIATIONS
from ctkit.learning_report import short_name, upsample


def evidence_maps(model, x):
    """x (B, 1, D, H, W) -> evidence (B, K, d, h, w) in float32 (float64 for a float64 model): the linear
    head's weights applied at every voxel of the last feature map, without the bias."""
    features = model.backbone(x)  # (B, C, d, h, w); under autocast in its lower precision
    weight = model.head.weight  # (K, C)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # the decomposition itself in full precision
        return torch.einsum("bcdhw,kc->bkdhw", features.to(dtype), weight.to(dtype))


def localisation_scores(evidence, region, finding=None):
    """One finding's evidence map on the feature grid (d, h, w) against the boolean region (D, H, W) it
    belongs to (e.g. its lobe, at the crop's resolution) and, where known, its own voxels:
    {"point_region": the grid cell of largest evidence has its centre voxel in the region (0/1),
    "point_finding": ... on the finding (nan without finding voxels), "share": the region's part of the
    positive mass of the trilinearly upsampled map (0 if no evidence is positive)}.

    The peak is taken on the grid, not on the upsampled map: trilinear upsampling is flat within half a cell
    of the crop's border, so there a peak at a border node ties over a slab of voxels, and the first of them
    (np.argmax's choice) lies on the crop's edge, wherever the cell's centre is."""
    grid = torch.as_tensor(np.asarray(evidence), dtype=torch.float64)
    cell = np.unravel_index(int(torch.argmax(grid)), tuple(grid.shape))
    peak = tuple(int((c + 0.5) * n / g) for c, n, g in zip(cell, region.shape, grid.shape))
    positive = torch.clamp(upsample(grid[None, None], region.shape)[0, 0], min=0).numpy()
    total = positive.sum()
    has_finding = finding is not None and bool(np.any(finding))
    return {
        "point_region": float(region[peak]),
        "point_finding": float(finding[peak]) if has_finding else float("nan"),
        "share": float(positive[region].sum() / total) if total > 0 else 0.0,
    }


def anatomy_shares(evidence, mask, num_structures):
    """(K, D, H, W) evidence at the crop's resolution and its (D, H, W) mask of seg classes 0..S ->
    (K, S + 1): per output the share of its positive evidence mass inside each structure 1..S, and outside
    all of them (last column; background). Rows of outputs without positive evidence are 0."""
    positive = torch.clamp(torch.as_tensor(evidence, dtype=torch.float64), min=0).flatten(1)  # (K, V)
    labels = torch.as_tensor(mask).long().flatten()
    sums = torch.zeros(positive.shape[0], num_structures + 1, dtype=torch.float64)
    sums.index_add_(1, labels, positive)  # (K, S + 1), column 0 the background
    total = sums.sum(1, keepdim=True)
    shares = torch.where(total > 0, sums / total.clamp(min=1e-300), torch.zeros_like(sums))
    return torch.cat([shares[:, 1:], shares[:, :1]], 1).numpy()


def evidence_by_anatomy(shares, labels, task):
    """{finding: {"positives": n, structure: mean share over its positive cases, ..., "outside": ...}}."""
    table = {}
    for k, name in enumerate(task.classes):
        positive = labels[:, k] == 1
        means = shares[positive, k].mean(0) if positive.any() else np.full(shares.shape[2], np.nan)
        table[name] = {
            "positives": int(positive.sum()),
            **dict(zip([*task.structures, "outside"], means.tolist())),
        }
    return table


def format_evidence(table, title):
    columns = list(next(iter(table.values())))[1:]
    head = f"{'finding':<28}{'pos':>5}" + "".join(f"{short_name(c):>13}" for c in columns)
    lines = [title, head, "-" * len(head)]
    for name, row in table.items():
        label = f"{ABBREVIATIONS.get(name, '')} {name}".strip()[:27]
        lines.append(f"{label:<28}{row['positives']:>5}" + "".join(f"{row[c]:13.3f}" for c in columns))
    return "\n".join(lines)
