"""Datasets, cropping and intensity preprocessing (paper §3.1, appendix A.2).

Arrays are (D, H, W) = (z, y, x) of a RAS-oriented volume; the paper's sizes are written x*y*z, so its
"240x240x120 pad, 192x192x96 crop" is (120, 240, 240) and (96, 192, 192) here.

Per sample the loader only copies an int16 window out of the stored volume (and the same window of the
mask); clipping and scaling to [-1, 1] happen on the training device (`normalize`). "Pad/crop to P, then a
random (train) or centre (eval) crop of C" is one window into the volume, padded where it leaves it.

`--dataset synthetic` is a seeded chest phantom (body, 5 lung lobes, heart, spine) with anatomically
localised findings, at a reduced size that trains on a laptop CPU:

    python data.py    # writes a few synthetic slices to synthetic_preview.png
"""
import argparse
import csv
import os

import nibabel as nib
import numpy as np
import torch

REGIONS = {  # paper Table 3; sizes (D, H, W)
    "chest": dict(window=(-1000, 200), pad=(120, 240, 240), crop=(96, 192, 192), structures=(
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
        "lung_middle_lobe_right", "lung_lower_lobe_right", "heart")),
    "abdomen": dict(window=(-150, 250), pad=(192, 256, 256), crop=(160, 176, 192), structures=(
        "liver", "spleen", "kidney_left", "kidney_right", "bowel")),
}
AIR_HU = -1024  # fill for CT outside the scanned volume; masks are filled with 0 (background)

SYNTHETIC = dict(pad=(40, 60, 60), crop=(32, 48, 48), sizes=dict(train=320, val=80, test=200))
SYNTHETIC_CLASSES = ("nodule_right_upper_lobe", "nodule_left_lower_lobe", "cardiomegaly",
                     "pleural_effusion", "emphysema")


def normalize(ct, window):
    """Clip HU to the window and min-max scale to [-1, 1]; runs on whatever device `ct` is on."""
    lo, hi = window
    return (ct.float().clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def window_start(shape, pad_size, crop_size, rng=None):
    """Start (per axis, in volume coordinates, may be negative) of the crop taken after pad/crop to pad_size.
    Random offset inside the padded box if rng is given (training), centred otherwise (evaluation)."""
    starts = []
    for n, p, c in zip(shape, pad_size, crop_size):
        offset = rng.integers(0, p - c + 1) if rng is not None else (p - c) // 2
        starts.append((n - p) // 2 + int(offset))  # (n - p) // 2 < 0 means symmetric padding
    return starts


def read_window(volume, starts, size, fill):
    """Copy volume[starts : starts + size] into a new array, filling what lies outside the volume."""
    out = np.full(size, fill, dtype=volume.dtype)
    src, dst = [], []
    for s, c, n in zip(starts, size, volume.shape):
        lo, hi = max(s, 0), min(s + c, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def nifti_layout(path):
    """Where the voxels of an uncompressed NIfTI written by make_masks.py lie: {shape (D, H, W), dtype, offset,
    affine}. Raises ValueError for anything a memory map could not read correctly (compressed, scaled, torn)."""
    path = str(path)
    if not path.endswith(".nii"):
        raise ValueError(f"{path}: expected an uncompressed .nii written by make_masks.py")
    with open(path, "rb") as f:
        header = nib.Nifti1Header.from_fileobj(f)
    shape = header.get_data_shape()
    slope, inter = header.get_slope_inter()
    if len(shape) != 3 or (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
        raise ValueError(f"{path}: expected an unscaled 3D volume, got shape {shape}, scaling {slope}, {inter}")
    dtype, offset = header.get_data_dtype(), int(header["vox_offset"])
    if os.path.getsize(path) < offset + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: file is shorter than its header says (truncated copy?)")
    return {"shape": shape[::-1], "dtype": dtype, "offset": offset, "affine": header.get_best_affine()}


def open_volume(path, layout):
    """Memory map of the voxels as (D, H, W): NIfTI's x-fastest order is C order for (z, y, x)."""
    return np.memmap(path, dtype=layout["dtype"], mode="r", offset=layout["offset"], shape=layout["shape"])


class CTDataset(torch.utils.data.Dataset):
    """Samples {"ct": int16 (1, D, H, W), "mask": uint8 (D, H, W) if masks, "label": float32 (K,), "index"}.

    `volumes[i]` gives (ct, mask or None) for case i: arrays or memory maps with the same (D, H, W) grid.
    Keys from `EpochSampler` encode (epoch, case), so every random crop is a pure function of
    (seed, epoch, case): reproducible, independent of worker count and resumable mid-run."""

    def __init__(self, case_ids, volumes, labels, pad_size, crop_size, train, seed=0, with_mask=False, max_label=255):
        self.case_ids, self.volumes, self.labels = list(case_ids), volumes, np.asarray(labels, np.float32)
        self.pad_size, self.crop_size, self.train, self.seed, self.with_mask = pad_size, crop_size, train, seed, with_mask
        self.max_label = max_label

    def __len__(self):
        return len(self.case_ids)

    def __getitem__(self, key):
        epoch, index = divmod(int(key), len(self))
        ct, mask = self.volumes[index]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        starts = window_start(ct.shape, self.pad_size, self.crop_size, rng)
        sample = {"ct": torch.from_numpy(read_window(ct, starts, self.crop_size, AIR_HU))[None],
                  "label": torch.from_numpy(self.labels[index]), "index": index}
        if self.with_mask:
            sample["mask"] = torch.from_numpy(read_window(mask, starts, self.crop_size, 0))
            if sample["mask"].max() > self.max_label:
                where = getattr(self.volumes, "mask_path", lambda i: self.case_ids[i])(index)
                raise ValueError(f"{where}: mask label {int(sample['mask'].max())} is outside this region's "
                                 f"scheme 0..{self.max_label} (made for another --region?)")
        return sample


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a DistributedSampler and yields epoch * n + index as keys; `skip` resumes mid-epoch by leaving
    out the batches already trained on (the order is a pure function of seed and epoch)."""

    def __init__(self, sampler, n, batch_size):
        self.sampler, self.n, self.batch_size, self.epoch, self.skip = sampler, n, batch_size, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip * self.batch_size
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.n + i for i in list(self.sampler)[self.skip:])

    def __len__(self):
        return len(self.sampler) - self.skip


class StoredVolumes:
    """volumes[i] -> (ct, mask or None): memory maps of make_masks.py's <prep>/ct/<case>.nii, <prep>/mask/<case>.nii.
    Every header is read (and CT/mask grids compared) once here, so bad files fail before training starts."""

    def __init__(self, prep_dir, case_ids, with_mask, skip_missing=False):
        self.entries, self.kept, self.missing = [], [], []
        for position, case in enumerate(case_ids):
            paths = [os.path.join(prep_dir, sub, f"{case}.nii") for sub in (("ct", "mask") if with_mask else ("ct",))]
            absent = [p for p in paths if not os.path.exists(p)]
            if absent:
                self.missing.append(absent[0])
                continue
            layouts = [nifti_layout(p) for p in paths]
            if layouts[0]["dtype"] != np.int16 or (with_mask and layouts[1]["dtype"] != np.uint8):
                raise ValueError(f"{paths}: expected int16 CT and uint8 mask from make_masks.py")
            if with_mask and (layouts[0]["shape"] != layouts[1]["shape"]
                              or not np.allclose(layouts[0]["affine"], layouts[1]["affine"], atol=1e-3)):
                raise ValueError(f"{paths[1]}: grid {layouts[1]['shape']} does not match its CT {paths[0]} "
                                 f"{layouts[0]['shape']} (shape or affine)")
            self.entries.append(list(zip(paths, layouts)))
            self.kept.append(position)
        if self.missing and not skip_missing:
            raise FileNotFoundError(f"{len(self.missing)} labelled case(s) have no preprocessed volume or mask, e.g. "
                                    f"{self.missing[0]} (run make_masks.py first, or pass --skip-missing)")

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        volumes = [open_volume(path, layout) for path, layout in self.entries[i]]
        return volumes[0], volumes[1] if len(volumes) > 1 else None

    def mask_path(self, i):
        return self.entries[i][-1][0]


def read_label_table(path, classes, id_column):
    """{split: (case ids, labels (N, K))} from a CSV with id_column, split and one column per class."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (id_column, "split", *classes) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        rows = list(reader)
    tables = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            tables[split] = ([r[id_column] for r in chosen], np.array([[float(r[c]) for c in classes] for r in chosen]))
    return tables


def build_datasets(args):
    """{split: CTDataset} and the task description (region, classes, structures, window, pad, crop)."""
    info = dict(region="chest", classes=SYNTHETIC_CLASSES, pad=SYNTHETIC["pad"], crop=SYNTHETIC["crop"])
    info.update(structures=REGIONS[info["region"]]["structures"], window=REGIONS[info["region"]]["window"])
    if args.crop:
        info["crop"] = tuple(args.crop)
        info["pad"] = tuple(max(p, c) for p, c in zip(info["pad"], args.crop))
    splits = {}
    if args.data_path:  # phantoms written by `python data.py --write-synthetic DIR` and run through make_masks.py
        tables = read_label_table(os.path.join(args.data_path, "labels.csv"), SYNTHETIC_CLASSES, "case_id")
    else:
        sizes = args.synthetic_cases or [SYNTHETIC["sizes"][s] for s in ("train", "val", "test")]
        tables = {split: synthetic_split(split, n) for split, n in zip(("train", "val", "test"), sizes)}
    for split, table in tables.items():
        cases, labels = table[0], table[-1]
        if args.data_path:
            volumes = StoredVolumes(args.prep_dir, cases, args.seg, args.skip_missing)
            cases, labels = [cases[i] for i in volumes.kept], labels[volumes.kept]
            if volumes.missing:
                print(f"{split}: skipped {len(volumes.missing)} case(s) without preprocessed files: "
                      + ", ".join(volumes.missing))
        else:
            volumes = table[1]
        if not cases:
            raise ValueError(f"the {split} split of {args.dataset} is empty")
        splits[split] = CTDataset(cases, volumes, labels, info["pad"], info["crop"], train=split == "train",
                                  seed=args.seed, with_mask=args.seg, max_label=len(info["structures"]))
    return splits, info


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
                nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine),
                         os.path.join(out_dir, sub, f"{case}.nii.gz"))
            rows.append([case, split, *(int(v) for v in label)])
    with open(os.path.join(out_dir, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "split", *SYNTHETIC_CLASSES], *rows])


# ----------------------------------------------------------------------------- synthetic chest phantoms

def _ellipsoid(z, y, x, center, radii):
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((x - center[2]) / radii[2]) ** 2


def _sphere_at(rng, candidates, shape, radius):
    """Boolean ball of `radius` voxels around a random voxel drawn from the flat indices `candidates`."""
    cz, cy, cx = np.unravel_index(rng.choice(candidates), shape)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return _ellipsoid(z, y, x, (cz, cy, cx), (radius,) * 3) <= 1


def make_phantom(rng, shape=(40, 60, 60)):
    """One synthetic chest CT (int16 HU), its mask (chest scheme: 1-5 lobes, 6 heart) and its labels
    (SYNTHETIC_CLASSES). Patient's left is low x (RAS), anterior is high y, superior is high z."""
    d, h, w = shape
    u = min(h, w) / 60.0  # lengths below are for a 60-voxel-wide slice
    labels = rng.random(len(SYNTHETIC_CLASSES)) < (0.35, 0.35, 0.3, 0.3, 0.3)
    angle = np.deg2rad(rng.uniform(-8, 8))
    shift = rng.uniform(-2, 2, size=2) * u
    z = np.arange(d, dtype=np.float32)[:, None, None]
    y0 = np.arange(h, dtype=np.float32)[None, :, None] - h / 2 - shift[0]
    x0 = np.arange(w, dtype=np.float32)[None, None, :] - w / 2 - shift[1]
    y, x = np.cos(angle) * y0 - np.sin(angle) * x0, np.sin(angle) * y0 + np.cos(angle) * x0  # rotated frame

    ct = np.full(shape, AIR_HU, np.float32)
    mask = np.zeros(shape, np.uint8)
    body = (y / (20 * u * rng.uniform(0.93, 1.07))) ** 2 + (x / (27 * u * rng.uniform(0.93, 1.07))) ** 2
    body = np.broadcast_to(body, shape)
    ct[body <= 1] = -100  # subcutaneous fat
    ct[body <= 0.8] = 35  # soft tissue
    ct[np.broadcast_to((y + 15 * u) ** 2 + x ** 2 <= (4 * u) ** 2, shape)] = 400  # spine

    lung_hu = -880 if labels[4] else -850
    scale = rng.uniform(0.9, 1.1)
    for side, first_label in ((-1, 1), (1, 3)):  # left lung: lobes 1-2; right lung: lobes 3-5
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
    heart = _ellipsoid(z, y, x, (0.3 * d, 6 * u, -3 * u), (0.2 * d * heart_scale, 9 * u * heart_scale,
                                                           10 * u * heart_scale)) <= 1
    ct[heart], mask[heart] = 40, 6

    lung_voxels = np.flatnonzero((mask.ravel() >= 1) & (mask.ravel() <= 5))
    for _ in range(25):  # vessels: small bright dots everywhere in the lungs
        ct[_sphere_at(rng, lung_voxels, shape, u)] = -50
    if labels[4]:  # emphysema: diffuse low-attenuation blobs, not tied to any lobe
        for _ in range(40):
            ct[_sphere_at(rng, lung_voxels, shape, rng.uniform(1, 2.5) * u) & (mask > 0) & (mask < 6)] = -990
    if labels[3]:  # effusion: fluid replacing the dependent base of one or both lungs
        sides = [(1, 2), (3, 4, 5)][rng.integers(2)] if rng.random() < 0.6 else (1, 2, 3, 4, 5)
        base = (z < 0.3 * d - 0.2 * d * y / (13 * u)) & np.isin(mask, sides)  # higher posteriorly
        ct[base], mask[base] = 15, 0
    lobe_nodules = [(3, labels[0]), (2, labels[1])]  # right upper, left lower
    if rng.random() < 0.5:  # a distractor nodule in a lobe that no label is about
        lobe_nodules.append((int(rng.choice([1, 4, 5])), True))
    for lobe, present in lobe_nodules:
        voxels = np.flatnonzero(mask.ravel() == lobe)
        if present and voxels.size:
            ct[_sphere_at(rng, voxels, shape, rng.uniform(2.5, 4) * u)] = 40

    ct += rng.normal(0, 20, size=shape).astype(np.float32)
    ct[(mask == 0) & (ct < -1000)] = AIR_HU
    return np.clip(ct, -1024, 3071).astype(np.int16), mask, labels.astype(np.float32)


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the synthetic phantoms as NIfTI files, or preview them.")
    parser.add_argument("--write-synthetic", metavar="DIR", help="write ct/, totalseg/ and labels.csv into DIR")
    parser.add_argument("--cases", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="split sizes")
    cli = parser.parse_args()
    if cli.write_synthetic:
        write_synthetic(cli.write_synthetic, dict(zip(("train", "val", "test"), cli.cases)) if cli.cases else None)
        print(f"wrote {cli.write_synthetic}/ct, totalseg and labels.csv")
    else:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        cases, volumes, labels = synthetic_split("train", 4)
        fig, axes = plt.subplots(2, 4, figsize=(12, 6))
        for k, ((ct, mask), label) in enumerate(zip(volumes, labels)):
            axes[0, k].imshow(ct[ct.shape[0] // 3], cmap="gray", vmin=-1000, vmax=200, origin="lower")
            axes[0, k].set_title(", ".join(c for c, v in zip(SYNTHETIC_CLASSES, label) if v) or "normal", fontsize=7)
            axes[1, k].imshow(mask[:, :, ct.shape[2] // 3], cmap="tab10", vmin=0, vmax=9, origin="lower")
        fig.savefig("synthetic_preview.png", dpi=80)
        print("wrote synthetic_preview.png (axial CT slices, sagittal masks)")
