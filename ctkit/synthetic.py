"""Synthetic chest CT phantoms with anatomically localised findings (stand-in for CT-RATE / RAD-ChestCT).

Seeded and deterministic: body with fat and soft tissue, spine, two lungs split by fissures into 5 lobes, the
heart, vessels and noise, in HU, with anatomical variation (size, position, +-8 degree rotation). Findings: a
nodule in the right upper lobe, a nodule in the left lower lobe (decoy nodules also occur in other lobes and
must be ignored; NODULES), cardiomegaly, pleural effusion at a lung base, emphysema (diffuse). Masks use
the chest scheme of the prepared masks (1-5 lobes, 6 heart). Arrays are (D, H, W) = (z, y, x) in RAS at a
reduced size, about the task's pad box (40 x 60 x 60 by default; `train.py --crop` scales the box, and the
phantoms with it: the same picture at a finer resolution). The findings' voxels are kept apart
(make_phantom's findings map) to score where a model's evidence lies; they are never used for training.

    python -m ctkit.synthetic                       # synthetic_preview.png: a few slices and masks
    python -m ctkit.synthetic --write synth/ [--pad D H W]  # synth/ct, synth/totalseg (TotalSegmentator ids),
                                                            # synth/labels.csv
"""

import argparse
import concurrent.futures
import multiprocessing
import os

import nibabel as nib
import numpy as np

from ctkit import utils
from ctkit.ct_io import AIR_HU
from ctkit.labels import SYNTHETIC_CLASSES
from ctkit.regions import REGIONS

SYNTHETIC = dict(pad=(40, 60, 60), crop=(32, 48, 48), sizes=dict(train=320, val=80, test=200))
# the phantoms' mask labels: 1-5 lobes, 6 heart
SCHEME = dict(enumerate(REGIONS["chest"]["structures"], start=1))
PARALLEL_VOXELS = 2_000_000  # pad boxes this large: phantoms made in parallel (120x240x240: 0.26 s each)
# The localised findings' difficulty: nodule radius (voxels of a 60-voxel-wide slice), drawn uniformly, and
# how often a decoy nodule appears in a lobe no label is about. docs/synthetic_study.md: how they were chosen.
NODULES = dict(radius=(4.5, 6.0), decoy_probability=0.25)  # calibrated (level D); before: (2.5, 4.0), 0.5
# The localised findings: (class, the lobe of the chest scheme it lies in); the findings map marks the voxels
# of finding k with k + 1.
LOCALISED = (("nodule_right_upper_lobe", 3), ("nodule_left_lower_lobe", 2))
# The "fissures" variant (docs/synthetic_study_fissures.md): the labels need each case's lobes. Fissures are
# visible sheets, their offset, slope and the horizontal fissure's height vary widely (in the lung's own -1..1
# coordinates); each nodule lies against the fissure of its lobe, and a negative case holds a decoy across the
# same fissure, in the neighbouring lobe of the same lung, with probability `decoy`. Nodule balls stay inside
# the evaluated centre crop (within `inside` x the size of the centre: the crop is 0.8 of the pad box and
# boxes vary by +-10 %). Lengths in units of a 60-voxel-wide slice.
VARIANTS = ("default", "fissures")
FISSURES = dict(
    offset=(-0.7, 0.8),
    slope=(-0.2, 1.8),
    horizontal=(-0.6, 0.4),
    hu=-700,
    half_width=0.5,
    radius=(4.5, 6.0),
    gap=1.0,
    decoy=1.0,
    inside=0.36,
)
NEIGHBOURS = {3: (4, 5), 2: (1,)}
REDRAWS = 50  # the lobes across the fissures of each localised finding's lobe


def _ellipsoid(z, y, x, center, radii):
    return (
        ((z - center[0]) / radii[0]) ** 2
        + ((y - center[1]) / radii[1]) ** 2
        + ((x - center[2]) / radii[2]) ** 2
    )


def _ball_at(rng, candidates, shape, radius):
    """A ball of `radius` voxels around a random voxel drawn from the flat indices `candidates`, as
    (box, ball): the slices of its bounding box and the boolean ball inside it (the same voxels as a
    whole-volume test, at the cost of the box only)."""
    center = np.unravel_index(rng.choice(candidates), shape)
    reach = int(np.ceil(radius)) + 1
    box = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, n)) for c, n in zip(center, shape))
    z, y, x = np.ogrid[box]
    return box, _ellipsoid(z, y, x, center, (radius,) * 3) <= 1


def make_phantom(rng, shape=(40, 60, 60), variant="default"):
    """One synthetic chest CT (int16 HU), its mask (chest scheme: 1-5 lobes, 6 heart), its labels
    (SYNTHETIC_CLASSES) and its findings map (uint8: k + 1 on the voxels of localised finding k of
    LOCALISED, 0 elsewhere; never used for training). Patient's left is low x (RAS), anterior is high y,
    superior is high z. Every length scales with the shape: `u` is the unit of a 60-voxel-wide slice.
    variant "fissures": visible, widely varying fissures and nodules against them (FISSURES)."""
    u = min(shape[1:]) / 60.0
    labels = rng.random(len(SYNTHETIC_CLASSES)) < (0.35, 0.35, 0.3, 0.3, 0.3)
    for _ in range(REDRAWS):  # the variant draws the case again where its lobes leave no room for a nodule
        drawn = _case(rng, shape, u, labels, variant)
        if drawn:
            break
    else:
        raise RuntimeError(f"no room for the nodules of a {variant} phantom of {shape} in {REDRAWS} draws")
    ct, mask, findings = drawn
    ct += rng.normal(0, 20, size=shape).astype(np.float32)
    ct[(mask == 0) & (ct < -1000)] = AIR_HU
    return np.clip(ct, -1024, 3071).astype(np.int16), mask, labels.astype(np.float32), findings


def _case(rng, shape, u, labels, variant):
    """The anatomy and findings of make_phantom before noise: (ct float32, mask, findings), or None where
    the fissures variant finds no room for a nodule."""
    ct, mask, (z, y, x) = _anatomy(rng, shape, u, labels, variant == "fissures")
    findings = np.zeros(shape, np.uint8)
    lung_voxels = np.flatnonzero((mask.ravel() >= 1) & (mask.ravel() <= 5))
    for _ in range(25):  # vessels: small bright dots everywhere in the lungs
        box, ball = _ball_at(rng, lung_voxels, shape, u)
        ct[box][ball] = -50
    if labels[4]:  # emphysema: diffuse low-attenuation blobs, not tied to any lobe
        for _ in range(40):
            box, ball = _ball_at(rng, lung_voxels, shape, rng.uniform(1, 2.5) * u)
            ct[box][ball & (mask[box] > 0) & (mask[box] < 6)] = -990
    if labels[3]:  # effusion: fluid replacing the dependent base of one or both lungs
        sides = [(1, 2), (3, 4, 5)][rng.integers(2)] if rng.random() < 0.6 else (1, 2, 3, 4, 5)
        level = 0.3 * shape[0] - 0.2 * shape[0] * y / (13 * u)  # the fluid level: higher posteriorly
        base = (z < level) & np.isin(mask, sides)
        ct[base], mask[base] = 15, 0
    if variant != "fissures":
        _nodules(rng, ct, mask, findings, labels, u)
    elif not _nodules_at_fissures(rng, ct, mask, findings, labels, u):
        return None
    return ct, mask, findings


def _nodules(rng, ct, mask, findings, labels, u):
    """The default phantoms' nodules: anywhere in their lobe; a decoy in a lobe no label is about."""
    lobe_nodules = [(LOCALISED[0][1], labels[0], 1), (LOCALISED[1][1], labels[1], 2)]
    if rng.random() < NODULES["decoy_probability"]:
        lobe_nodules.append((int(rng.choice([1, 4, 5])), True, 0))
    for lobe, present, finding in lobe_nodules:
        voxels = np.flatnonzero(mask.ravel() == lobe)
        if present and voxels.size:
            box, ball = _ball_at(rng, voxels, mask.shape, rng.uniform(*NODULES["radius"]) * u)
            ct[box][ball] = 40
            if finding:  # a decoy is no finding
                findings[box][ball] = finding


def _nodules_at_fissures(rng, ct, mask, findings, labels, u):
    """The fissures variant's nodules: for localised finding k in lobe L, a positive case gets a nodule in L
    against the fissure to its neighbouring lobes (NEIGHBOURS), a negative one, with probability `decoy`, a
    nodule in those neighbours against the fissure to L. The ball's centre lies within `gap` of the lobes
    across and at least half a radius inside the lung, and the ball is drawn on its own lobe's voxels only:
    flattened against the fissure (and the pleura), so that a nodule and a decoy at the same place differ
    only in the side of the fissure they fill. False: no room for one."""
    from scipy import ndimage  # scikit-learn's dependency; only this variant needs distance transforms

    shape, index = np.array(mask.shape), np.indices(mask.shape, sparse=True)
    in_lung = ndimage.distance_transform_edt((mask >= 1) & (mask <= 5))
    for k, (_, lobe) in enumerate(LOCALISED):
        if not labels[k] and rng.random() >= FISSURES["decoy"]:
            continue
        radius = rng.uniform(*FISSURES["radius"]) * u
        home, other = ((lobe,), NEIGHBOURS[lobe]) if labels[k] else (NEIGHBOURS[lobe], (lobe,))
        across = ndimage.distance_transform_edt(~np.isin(mask, other))  # to the nearest voxel across
        fits = np.isin(mask, home) & (across <= FISSURES["gap"] * u + 0.5) & (in_lung >= radius / 2)
        for axis, i in enumerate(index):  # the ball stays inside the evaluated crop
            fits &= np.abs(i + 0.5 - shape[axis] / 2) <= FISSURES["inside"] * shape[axis] - radius
        candidates = np.flatnonzero(fits)
        if candidates.size == 0:
            return False
        box, ball = _ball_at(rng, candidates, mask.shape, radius)
        ball &= np.isin(mask[box], home)
        ct[box][ball] = 40
        if labels[k]:  # a decoy is no finding
            findings[box][ball] = k + 1
    return True


def _anatomy(rng, shape, u, labels, fissures=False):
    """Body, spine, five lobes and the heart: (ct float32 HU, mask uint8, (z, y, x) rotated coordinates).
    fissures: the variant's widely varying, visible fissures (FISSURES)."""
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
        if fissures:
            offset, slope = rng.uniform(*FISSURES["offset"]), rng.uniform(*FISSURES["slope"])
            oblique, horizontal = offset - slope * vy, rng.uniform(*FISSURES["horizontal"])
        else:
            oblique, horizontal, slope = 0.1 - 0.6 * vy + rng.uniform(-0.1, 0.1), 0.05, 0.6
        lower = vz < oblique  # below the oblique fissure
        middle = ~lower & (vz < horizontal) if side > 0 else np.zeros_like(lower)  # right lung only
        ct[lung] = lung_hu
        if fissures:  # voxels within half_width of either fissure's plane (voxels of a rotated frame)
            width = FISSURES["half_width"] * u
            sheet = np.abs(vz - oblique) < width * np.hypot(1 / radii[0], slope / radii[1])
            if side > 0:
                sheet |= ~lower & (np.abs(vz - horizontal) < width / radii[0])
            ct[lung & sheet] = FISSURES["hu"]
        if side < 0:
            mask[lung & ~lower], mask[lung & lower] = 1, 2
        else:  # the middle lobe: below the horizontal fissure, anterior to the oblique one
            mask[lung & ~lower & ~middle], mask[lung & middle], mask[lung & lower] = 3, 4, 5
    heart_scale = rng.normal(1.0, 0.05) * (1.3 if labels[2] else 1.0)
    radii = (0.2 * d * heart_scale, 9 * u * heart_scale, 10 * u * heart_scale)
    heart = _ellipsoid(z, y, x, (0.3 * d, 6 * u, -3 * u), radii) <= 1
    ct[heart], mask[heart] = 40, 6
    return ct, mask, (z, y, x)


def _phantom(seed, split, i, pad, variant):
    """Phantom i of a split for a pad box: its size is the box varied by up to +-4 voxels per axis (at the
    default box; the variation scales with it), then everything scales with the size (make_phantom)."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), i])
    shape = tuple(int(p + round(rng.integers(-4, 5) * p / s)) for p, s in zip(pad, SYNTHETIC["pad"]))
    return make_phantom(rng, shape, variant)


def phantoms(split, n, seed=0, pad=None, variant="default"):
    """The n phantoms (ct, mask, labels, findings) of a split, in order, for a pad box (default: the synthetic
    task's) and a variant (VARIANTS). Each is a pure function of (seed, split, index, pad, variant); large
    ones are made in parallel processes (forked, as DataLoader workers are: the children run numpy only),
    with the same bytes."""
    pad = tuple(pad or SYNTHETIC["pad"])
    jobs = [(seed, split, i, pad, variant) for i in range(n)]
    workers = min(os.cpu_count() or 1, 16, n) if np.prod(pad) >= PARALLEL_VOXELS else 1
    if workers <= 1:
        yield from (_phantom(*job) for job in jobs)
        return
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_phantom, *zip(*jobs), chunksize=max(1, n // (4 * workers)))


def synthetic_split(split, n, seed=0, pad=None, variant="default"):
    """Deterministic phantoms for one split: (case ids, [(ct, mask)], labels (n, K)); sizes vary around
    the pad box so that padding and cropping are both exercised."""
    cases, volumes, labels = [], [], []
    for i, (ct, mask, label, _) in enumerate(phantoms(split, n, seed, pad, variant)):
        cases.append(f"synthetic_{split}_{i:04d}")
        volumes.append((ct, mask))
        labels.append(label)
    return cases, volumes, np.stack(labels)


def write_synthetic(out_dir, sizes=None, pad=None, variant="default"):
    """Phantoms (for a pad box; default the synthetic task's; of a variant) as a real dataset would come:
    <out>/ct/<case>.nii.gz (HU, RAS, 1.5 x 1.5 x 3 mm), <out>/totalseg/<case>.nii.gz (TotalSegmentator
    'total' ids) and <out>/labels.csv."""
    from totalsegmentator.map_to_binary import class_map  # heavy optional dependency: only for writing files

    ts_ids = {name: i for i, name in class_map["total"].items()}
    to_totalseg = np.zeros(256, np.uint8)
    for label, name in enumerate(REGIONS["chest"]["structures"], start=1):
        to_totalseg[label] = ts_ids[name]
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for sub in ("ct", "totalseg"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rows = []
    for split, n in (sizes or SYNTHETIC["sizes"]).items():
        cases, volumes, labels = synthetic_split(split, n, pad=pad, variant=variant)
        for case, (ct, mask), label in zip(cases, volumes, labels):
            for sub, array in (("ct", ct), ("totalseg", to_totalseg[mask])):  # (D, H, W) -> NIfTI's (x, y, z)
                with utils.atomic_path(os.path.join(out_dir, sub, f"{case}.nii.gz")) as tmp:
                    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), tmp)
            rows.append([case, split, *(int(v) for v in label)])
    utils.write_csv(os.path.join(out_dir, "labels.csv"), ["case_id", "split", *SYNTHETIC_CLASSES], rows)


def write_preview(path="synthetic_preview.png", variant="default"):
    """Four training phantoms: an axial CT slice (titled with its findings) and a sagittal mask slice each."""
    import matplotlib  # optional for everything else: imported where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, volumes, labels = synthetic_split("train", 4, variant=variant)
    fig, axes = plt.subplots(2, 4, figsize=(12, 6))
    for k, ((ct, mask), label) in enumerate(zip(volumes, labels)):
        axes[0, k].imshow(ct[ct.shape[0] // 3], cmap="gray", vmin=-1000, vmax=200, origin="lower")
        findings = ", ".join(c for c, v in zip(SYNTHETIC_CLASSES, label) if v)
        axes[0, k].set_title(findings or "normal", fontsize=7)
        axes[1, k].imshow(mask[:, :, ct.shape[2] // 3], cmap="tab10", vmin=0, vmax=9, origin="lower")
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def get_args_parser():
    parser = argparse.ArgumentParser(description="The synthetic phantoms as NIfTI files, or a preview")
    parser.add_argument("--write", metavar="DIR", help="write ct/, totalseg/ and labels.csv into DIR")
    parser.add_argument("--cases", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="split sizes")
    parser.add_argument("--pad", type=int, nargs=3, metavar=("D", "H", "W"), help="phantom size (40 60 60)")
    parser.add_argument("--variant", default="default", choices=VARIANTS, help="which phantoms (FISSURES)")
    return parser


def main(args):
    if not args.write:
        write_preview(variant=args.variant)
        print("wrote synthetic_preview.png (axial CT slices, sagittal masks)")
        return
    sizes = dict(zip(("train", "val", "test"), args.cases)) if args.cases else None
    write_synthetic(args.write, sizes, args.pad, args.variant)
    print(f"wrote {args.write}/ct, totalseg and labels.csv")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
