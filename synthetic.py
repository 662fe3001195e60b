"""Synthetic chest CT phantoms with anatomically localised findings (stand-in for CT-RATE / RAD-ChestCT).

Seeded and deterministic: body with fat and soft tissue, spine, two lungs split by fissures into 5 lobes, the
heart, vessels and noise, in HU, with anatomical variation (size, position, +-8 degree rotation). Findings: a
nodule in the right upper lobe, a nodule in the left lower lobe (decoy nodules also occur in other lobes and
must be ignored; NODULES), cardiomegaly, pleural effusion at a lung base, emphysema (diffuse). Masks use the
chest scheme of make_masks.py (1-5 lobes, 6 heart). Arrays are (D, H, W) = (z, y, x) in RAS at a reduced size.

    python synthetic.py                          # synthetic_preview.png: a few slices and masks
    python synthetic.py --write synth/    # synth/ct, synth/totalseg (TotalSegmentator ids), synth/labels.csv
"""

import argparse
import os

import nibabel as nib
import numpy as np

import utils
from data import AIR_HU, REGIONS
from labels import SYNTHETIC_CLASSES

SYNTHETIC = dict(pad=(40, 60, 60), crop=(32, 48, 48), sizes=dict(train=320, val=80, test=200))
# The localised findings' difficulty: nodule radius (voxels of a 60-voxel-wide slice), drawn uniformly, and
# how often a decoy nodule appears in a lobe no label is about. docs/synthetic_study.md: how they were chosen.
NODULES = dict(radius=(4.5, 6.0), decoy_probability=0.25)  # calibrated (level D); before: (2.5, 4.0), 0.5


def _ellipsoid(z, y, x, center, radii):
    return (
        ((z - center[0]) / radii[0]) ** 2
        + ((y - center[1]) / radii[1]) ** 2
        + ((x - center[2]) / radii[2]) ** 2
    )


def _sphere_at(rng, candidates, shape, radius):
    """Boolean ball of `radius` voxels around a random voxel drawn from the flat indices `candidates`."""
    cz, cy, cx = np.unravel_index(rng.choice(candidates), shape)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return _ellipsoid(z, y, x, (cz, cy, cx), (radius,) * 3) <= 1


def make_phantom(rng, shape=(40, 60, 60)):
    """One synthetic chest CT (int16 HU), its mask (chest scheme: 1-5 lobes, 6 heart) and its labels
    (SYNTHETIC_CLASSES). Patient's left is low x (RAS), anterior is high y, superior is high z."""
    u = min(shape[1:]) / 60.0  # lengths below are for a 60-voxel-wide slice
    labels = rng.random(len(SYNTHETIC_CLASSES)) < (0.35, 0.35, 0.3, 0.3, 0.3)
    ct, mask, (z, y, x) = _anatomy(rng, shape, u, labels)
    lung_voxels = np.flatnonzero((mask.ravel() >= 1) & (mask.ravel() <= 5))
    for _ in range(25):  # vessels: small bright dots everywhere in the lungs
        ct[_sphere_at(rng, lung_voxels, shape, u)] = -50
    if labels[4]:  # emphysema: diffuse low-attenuation blobs, not tied to any lobe
        for _ in range(40):
            ct[_sphere_at(rng, lung_voxels, shape, rng.uniform(1, 2.5) * u) & (mask > 0) & (mask < 6)] = -990
    if labels[3]:  # effusion: fluid replacing the dependent base of one or both lungs
        sides = [(1, 2), (3, 4, 5)][rng.integers(2)] if rng.random() < 0.6 else (1, 2, 3, 4, 5)
        level = 0.3 * shape[0] - 0.2 * shape[0] * y / (13 * u)  # the fluid level: higher posteriorly
        base = (z < level) & np.isin(mask, sides)
        ct[base], mask[base] = 15, 0
    lobe_nodules = [(3, labels[0]), (2, labels[1])]  # right upper, left lower
    if rng.random() < NODULES["decoy_probability"]:  # a distractor nodule in a lobe no label is about
        lobe_nodules.append((int(rng.choice([1, 4, 5])), True))
    for lobe, present in lobe_nodules:
        voxels = np.flatnonzero(mask.ravel() == lobe)
        if present and voxels.size:
            ct[_sphere_at(rng, voxels, shape, rng.uniform(*NODULES["radius"]) * u)] = 40
    ct += rng.normal(0, 20, size=shape).astype(np.float32)
    ct[(mask == 0) & (ct < -1000)] = AIR_HU
    return np.clip(ct, -1024, 3071).astype(np.int16), mask, labels.astype(np.float32)


def _anatomy(rng, shape, u, labels):
    """Body, spine, five lobes and the heart: (ct float32 HU, mask uint8, (z, y, x) rotated coordinates)."""
    d, h, w = shape
    angle = np.deg2rad(rng.uniform(-8, 8))
    shift = rng.uniform(-2, 2, size=2) * u
    z = np.arange(d, dtype=np.float32)[:, None, None]
    y0 = np.arange(h, dtype=np.float32)[None, :, None] - h / 2 - shift[0]
    x0 = np.arange(w, dtype=np.float32)[None, None, :] - w / 2 - shift[1]
    y, x = np.cos(angle) * y0 - np.sin(angle) * x0, np.sin(angle) * y0 + np.cos(angle) * x0  # rotated frame
    ct, mask = np.full(shape, AIR_HU, np.float32), np.zeros(shape, np.uint8)
    body = (y / (20 * u * rng.uniform(0.93, 1.07))) ** 2 + (x / (27 * u * rng.uniform(0.93, 1.07))) ** 2
    body = np.broadcast_to(body, shape)
    ct[body <= 1] = -100  # subcutaneous fat
    ct[body <= 0.8] = 35  # soft tissue
    ct[np.broadcast_to((y + 15 * u) ** 2 + x**2 <= (4 * u) ** 2, shape)] = 400  # spine
    lung_hu = -880 if labels[4] else -850  # emphysema also lowers the lungs' attenuation a little
    scale = rng.uniform(0.9, 1.1)
    for side in (-1, 1):  # left lung: lobes 1-2; right lung: lobes 3-5
        center, radii = (0.55 * d, -u, side * 12 * u), (0.42 * d * scale, 13 * u * scale, 9 * u * scale)
        lung = _ellipsoid(z, y, x, center, radii) <= 1
        vz, vy = (z - center[0]) / radii[0], (y - center[1]) / radii[1]  # -1..1; +vy anterior
        lower = vz < 0.1 - 0.6 * vy + rng.uniform(-0.1, 0.1)  # oblique fissure
        ct[lung] = lung_hu
        if side < 0:
            mask[lung & ~lower], mask[lung & lower] = 1, 2
        else:
            middle = ~lower & (vz < 0.05)  # below the horizontal fissure, anterior to the oblique one
            mask[lung & ~lower & ~middle], mask[lung & middle], mask[lung & lower] = 3, 4, 5
    heart_scale = rng.normal(1.0, 0.05) * (1.3 if labels[2] else 1.0)
    radii = (0.2 * d * heart_scale, 9 * u * heart_scale, 10 * u * heart_scale)
    heart = _ellipsoid(z, y, x, (0.3 * d, 6 * u, -3 * u), radii) <= 1
    ct[heart], mask[heart] = 40, 6
    return ct, mask, (z, y, x)


def synthetic_split(split, n, seed=0):
    """Deterministic phantoms for one split: (case ids, [(ct, mask)], labels (n, K)); sizes vary around
    the pad size so that padding and cropping are both exercised."""
    split_key = ("train", "val", "test").index(split)
    cases, volumes, labels = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, split_key, i])
        shape = tuple(int(s + rng.integers(-4, 5)) for s in SYNTHETIC["pad"])
        ct, mask, label = make_phantom(rng, shape)
        cases.append(f"synthetic_{split}_{i:04d}")
        volumes.append((ct, mask))
        labels.append(label)
    return cases, volumes, np.stack(labels)


def write_synthetic(out_dir, sizes=None):
    """Phantoms as a real dataset would come: <out>/ct/<case>.nii.gz (HU, RAS, 1.5 x 1.5 x 3 mm),
    <out>/totalseg/<case>.nii.gz (TotalSegmentator 'total' ids) and <out>/labels.csv."""
    from totalsegmentator.map_to_binary import class_map

    ts_ids = {name: i for i, name in class_map["total"].items()}
    to_totalseg = np.zeros(256, np.uint8)
    for label, name in enumerate(REGIONS["chest"]["structures"], start=1):
        to_totalseg[label] = ts_ids[name]
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for sub in ("ct", "totalseg"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rows = []
    for split, n in (sizes or SYNTHETIC["sizes"]).items():
        cases, volumes, labels = synthetic_split(split, n)
        for case, (ct, mask), label in zip(cases, volumes, labels):
            for sub, array in (("ct", ct), ("totalseg", to_totalseg[mask])):  # (D, H, W) -> NIfTI's (x, y, z)
                with utils.atomic_path(os.path.join(out_dir, sub, f"{case}.nii.gz")) as tmp:
                    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), tmp)
            rows.append([case, split, *(int(v) for v in label)])
    utils.write_csv(os.path.join(out_dir, "labels.csv"), ["case_id", "split", *SYNTHETIC_CLASSES], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Write the synthetic phantoms as NIfTI files, or preview them."
    )
    parser.add_argument("--write", metavar="DIR", help="write ct/, totalseg/ and labels.csv into DIR")
    parser.add_argument("--cases", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="split sizes")
    cli = parser.parse_args()
    if cli.write:
        write_synthetic(cli.write, dict(zip(("train", "val", "test"), cli.cases)) if cli.cases else None)
        print(f"wrote {cli.write}/ct, totalseg and labels.csv")
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cases, volumes, labels = synthetic_split("train", 4)
        fig, axes = plt.subplots(2, 4, figsize=(12, 6))
        for k, ((ct, mask), label) in enumerate(zip(volumes, labels)):
            axes[0, k].imshow(ct[ct.shape[0] // 3], cmap="gray", vmin=-1000, vmax=200, origin="lower")
            axes[0, k].set_title(
                ", ".join(c for c, v in zip(SYNTHETIC_CLASSES, label) if v) or "normal", fontsize=7
            )
            axes[1, k].imshow(mask[:, :, ct.shape[2] // 3], cmap="tab10", vmin=0, vmax=9, origin="lower")
        fig.savefig("synthetic_preview.png", dpi=80)
        print("wrote synthetic_preview.png (axial CT slices, sagittal masks)")
