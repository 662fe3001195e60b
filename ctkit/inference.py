"""A trained classifier over a split: one row per case (what fn computes from the normalised centre crops:
the class probabilities, the seg head's cross-entropy and Dice counts, evidence shares), every case once
across processes, in case order. train.py validates and writes a run's outputs with it; evaluate.py
--evidence and tools/predict.py use it too.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ctkit import ct_io, evidence, precision, utils
from ctkit.learning_report import dice_counts, upsample


@torch.no_grad()
def for_each_case(model, loader, window, amp, fn, empty):
    """fn(ct, batch) -> one row per case, for every case of the loader's dataset exactly once across
    processes, in case order; `empty`: a zero-row tensor of fn's shape and type (for a process without
    cases)."""
    model.eval()
    device = next(model.parameters()).device
    indices, rows = [torch.zeros(0, dtype=torch.long)], [empty]
    for batch in loader:
        ct = ct_io.normalize(batch["ct"].to(device, non_blocking=True), window)
        with torch.autocast(device.type, precision.amp_dtype(device), enabled=amp):
            rows.append(fn(ct, batch).cpu())
        indices.append(batch["index"])
    return utils.gather_cases(indices, rows, len(loader.dataset))


@torch.no_grad()
def segment(model, x):
    """Label map (B, D, H, W): the seg head's upsampled argmax, to show and score (never to classify)."""
    seg_logits = model.seg_head(model.backbone(x))
    return torch.cat([upsample(s[None].float(), x.shape[2:]).argmax(1) for s in seg_logits])


def seg_split(model, loader, task, amp=False):
    """Per case, the seg head on the centre crop: its cross-entropy summed over the crop's voxels (eq. 3) and
    per structure (intersection, predicted, true) voxels of its argmax: numpy ((N,) float64, (N, S, 3))."""
    n = len(task.structures)

    def fn(ct, batch):
        seg_logits = model.seg_head(model.backbone(ct))  # (B, S, d, h, w)
        targets = loader.dataset.seg_classes(batch["mask"].to(ct.device), batch["index"]).long()
        rows = []
        for logits, target in zip(seg_logits, targets):  # one full map at a time
            full = upsample(logits[None].float(), target.shape)  # (1, S, D, H, W), as in eq. 3
            ce = F.cross_entropy(full, target[None], reduction="sum").double()
            counts = dice_counts(full.argmax(1), target[None], n + 1)[0]
            rows.append(torch.cat([ce[None], counts.flatten().double()]))
        return torch.stack(rows)

    rows = for_each_case(model, loader, task.window, amp, fn, torch.zeros(0, 1 + 3 * n, dtype=torch.float64))
    return rows[:, 0], rows[:, 1:].reshape(-1, n, 3).astype(np.int64)


def evidence_split(model, loader, task, amp=False):
    """Per case and output, the share of its positive evidence (ctkit/evidence.py: eq. 1's linear head at
    every feature voxel, upsampled to the crop) inside each seg structure of the case's mask and outside all
    of them: numpy (N, outputs, structures + 1)."""
    n, outputs = len(task.structures), model.head.out_features

    def fn(ct, batch):
        maps = evidence.evidence_maps(model, ct)  # (B, K, d, h, w)
        masks = loader.dataset.seg_classes(batch["mask"], batch["index"])
        rows = [
            evidence.anatomy_shares(upsample(m[None], task.crop)[0].cpu(), mask, n)
            for m, mask in zip(maps, masks)
        ]
        return torch.from_numpy(np.stack(rows)).flatten(1)

    empty = torch.zeros(0, outputs * (n + 1), dtype=torch.float64)
    return for_each_case(model, loader, task.window, amp, fn, empty).reshape(-1, outputs, n + 1)


@torch.no_grad()
def head_grid(model, crop):
    """The (d, h, w) of the backbone's last feature map for a crop (one forward pass on zeros)."""
    device = next(model.parameters()).device
    return tuple(model.backbone(torch.zeros(1, 1, *crop, device=device)).shape[2:])
