"""Datasets, cropping and intensity preprocessing (paper §3.1, appendix A.2).

Arrays are (D, H, W) = (z, y, x) of a RAS-oriented volume; the paper's sizes are written x*y*z, so its
"240x240x120 pad, 192x192x96 crop" is (120, 240, 240) and (96, 192, 192) here.

Per sample the loader only copies an int16 window out of the stored volume (and the same window of the
mask); clipping and scaling to [-1, 1] happen on the training device (`normalize`). "Pad/crop to P, then a
random (train) or centre (eval) crop of C" is one window into the volume, padded where it leaves it.

Label tables are read from the files each dataset distributes (CT-RATE, RAD-ChestCT, RATIC = RSNA 2023
abdominal trauma); volumes and masks from make_masks.py's output (<prep>/ct, <prep>/mask). `synthetic` is the
phantom dataset of synthetic.py, in memory or written to files.
"""
import argparse
import csv
import mmap
import os
import warnings
import zlib

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

CTRATE_CLASSES = {  # the 18 columns of multi_abnormality_labels in the paper's Table 7 order: abbreviation
    "Arterial wall calcification": "AWC", "Atelectasis": "ATL", "Bronchiectasis": "BRE", "Cardiomegaly": "CDM",
    "Consolidation": "CON", "Coronary artery wall calcification": "CAC", "Emphysema": "EMP", "Hiatal hernia": "HH",
    "Interlobular septal thickening": "IST", "Lung nodule": "LN", "Lung opacity": "LOP", "Lymphadenopathy": "LAP",
    "Medical material": "MM", "Mosaic attenuation pattern": "MAP", "Peribronchial thickening": "PBT",
    "Pericardial effusion": "PCE", "Pleural effusion": "PLE", "Pulmonary fibrotic sequela": "PFS"}
RADCHEST_CLASSES = {  # paper Table 2 / 8 ("spetal" is "septal"; the column is "opacity")
    "catheter_or_port": "COP", "lymphadenopathy": "LAP", "septal_thickening": "ST", "hernia": "HER", "nodule": "NOD",
    "pericardial_effusion": "PCE", "scarring": "SCR", "bronchial_wall_thickening": "BWT", "opacity": "OPC",
    "emphysema": "EMP", "cardiomegaly": "CDM", "pleural_effusion": "PLE", "bronchiectasis": "BRE",
    "consolidation": "CON", "atelectasis": "ATL", "calcification": "CAL"}
RATIC_COLUMNS = {  # evaluated columns, paper Table 9 order; the model has 11 outputs (model.py)
    "any_injury": "AI", "bowel_healthy": "BH", "bowel_injury": "BI", "extravasation_healthy": "EH",
    "extravasation_injury": "EI", "kidney_healthy": "KH", "kidney_high": "KHI", "kidney_low": "KL",
    "liver_healthy": "LH", "liver_high": "LHI", "liver_low": "LL", "spleen_healthy": "SH", "spleen_high": "SHI",
    "spleen_low": "SL"}
RATIC_SPLIT = (2500, 647)  # patients, paper §3.1


class BadInput(ValueError):
    """Data that cannot be used as it is; the message names the file or column."""


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
    """volume[starts : starts + size], filled where it leaves the volume. Inside the volume this is a view (of a
    memory map, for stored volumes): the batch collation then makes the one copy of it."""
    src, dst = [], []
    for s, c, n in zip(starts, size, volume.shape):
        lo, hi = max(s, 0), min(s + c, n)
        if hi <= lo:
            return np.full(size, fill, dtype=volume.dtype)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    if all(d.start == 0 and d.stop == c for d, c in zip(dst, size)):
        return volume[tuple(src)]
    out = np.full(size, fill, dtype=volume.dtype)
    out[tuple(dst)] = volume[tuple(src)]
    return out


def nifti_layout(path):
    """Where the voxels of an uncompressed NIfTI written by make_masks.py lie: {shape (D, H, W), dtype, offset,
    affine}. Raises BadInput for anything a memory map could not read correctly (compressed, scaled, torn)."""
    path = str(path)
    if not path.endswith(".nii"):
        raise BadInput(f"{path}: expected an uncompressed .nii written by make_masks.py")
    with open(path, "rb") as f:
        header = nib.Nifti1Header.from_fileobj(f)
    shape = header.get_data_shape()
    slope, inter = header.get_slope_inter()
    if len(shape) != 3 or (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
        raise BadInput(f"{path}: expected an unscaled 3D volume, got shape {shape}, scaling {slope}, {inter}")
    dtype, offset = header.get_data_dtype(), int(header["vox_offset"])
    if os.path.getsize(path) < offset + int(np.prod(shape)) * dtype.itemsize:
        raise BadInput(f"{path}: file is shorter than its header says (truncated copy?)")
    return {"shape": shape[::-1], "dtype": dtype, "offset": offset, "affine": header.get_best_affine()}


class MappedVolume:
    """A stored (D, H, W) volume (NIfTI's x-fastest order is C order for (z, y, x)). Indexing with slices maps
    only the slices z0:z1 and fills their page tables in one call (MAP_POPULATE) instead of faulting page by page:
    a window then costs about one copy out of the page cache."""

    def __init__(self, path, layout):
        self.path, self.offset, self.shape, self.dtype = path, layout["offset"], layout["shape"], layout["dtype"]

    def __getitem__(self, index):  # (z, y, x) slices with step 1, as read_window makes them
        z, y, x = index
        plane = self.shape[1] * self.shape[2] * self.dtype.itemsize
        start = self.offset + z.start * plane
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), start - aligned + (z.stop - z.start) * plane, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), offset=aligned)
        count = (z.stop - z.start) * self.shape[1] * self.shape[2]
        slab = np.frombuffer(mapped, self.dtype, count, start - aligned).reshape(-1, *self.shape[1:])
        return slab[:, y, x]  # a read-only view of the page cache; the mapping lives as long as the view


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
        with warnings.catch_warnings():  # the windows are read-only views; collate() copies them into the batch
            warnings.simplefilter("ignore", UserWarning)
            sample = {"ct": torch.from_numpy(read_window(ct, starts, self.crop_size, AIR_HU))[None],
                      "label": torch.from_numpy(self.labels[index]), "index": index}
            if self.with_mask:
                sample["mask"] = torch.from_numpy(read_window(mask, starts, self.crop_size, 0))
        return sample

    def collate(self, samples):
        """Stack the samples (the one copy of each window) and check the mask labels on the contiguous batch."""
        batch = torch.utils.data.default_collate(samples)
        if self.with_mask and batch["mask"].max() > self.max_label:
            index = int(batch["index"][batch["mask"].flatten(1).amax(1).argmax()])
            where = getattr(self.volumes, "mask_path", lambda i: self.case_ids[i])(index)
            raise BadInput(f"{where}: mask label {int(batch['mask'].max())} is outside this region's "
                             f"scheme 0..{self.max_label} (made for another --region?)")
        return batch


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
            for path, layout, dtype in zip(paths, layouts, (np.int16, np.uint8)):
                if layout["dtype"] != dtype:
                    raise BadInput(f"{path}: data type {layout['dtype']}, expected {np.dtype(dtype)} (make_masks.py output)")
            if with_mask and (layouts[0]["shape"] != layouts[1]["shape"]
                              or not np.allclose(layouts[0]["affine"], layouts[1]["affine"], atol=1e-3)):
                raise BadInput(f"{paths[1]}: grid {layouts[1]['shape']} does not match its CT {paths[0]} "
                                 f"{layouts[0]['shape']} (shape or affine)")
            self.entries.append(list(zip(paths, layouts)))
            self.kept.append(position)
        if self.missing and not skip_missing:
            raise FileNotFoundError(f"{len(self.missing)} labelled case(s) have no preprocessed volume or mask, e.g. "
                                    f"{self.missing[0]} (run make_masks.py first, or pass --skip-missing)")

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        volumes = [MappedVolume(path, layout) for path, layout in self.entries[i]]
        return volumes[0], volumes[1] if len(volumes) > 1 else None

    def mask_path(self, i):
        return self.entries[i][-1][0]


def read_csv(path, columns):
    """Rows of a CSV as dicts; one clear error if the file or any required column is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: label file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(f"{path}: missing column(s) {missing}")
        return list(reader)


def label_matrix(rows, columns, path):
    try:
        return np.array([[float(r[c]) for c in columns] for r in rows], np.float32).reshape(len(rows), len(columns))
    except ValueError as error:
        raise BadInput(f"{path}: non-numeric label ({error})") from None


def find_file(root, name, max_depth=4):
    """root/name, or the shallowest file of that name below root (datasets get unpacked at different depths);
    breadth first, so the label files are found without listing tens of thousands of volumes."""
    level = [root]
    for _ in range(max_depth + 1):
        for folder in level:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        level = [e.path for folder in level for e in sorted(os.scandir(folder), key=lambda e: e.name) if e.is_dir()]
    raise FileNotFoundError(f"no {name} under {root} (searched {max_depth} folders deep)")


def ctrate_tables(root):
    """Split as distributed: train, and valid as the test set. Groups (for a held-out validation) = patients."""
    tables = {}
    for split, name in (("train", "train_predicted_labels.csv"), ("test", "valid_predicted_labels.csv")):
        path = find_file(root, name)
        rows = read_csv(path, ["VolumeName", *CTRATE_CLASSES])
        ids = [r["VolumeName"].split(".nii")[0] for r in rows]
        tables[split] = (ids, label_matrix(rows, CTRATE_CLASSES, path), ["_".join(i.split("_")[:2]) for i in ids])
    return tables


def radchest_tables(root):
    """Class = max over the columns '<abnormality>*<location>' whose abnormality equals the class exactly
    (so 'nodule' does not take 'nodulegr1cm'). Train + valid for training, test for testing (paper §3.1)."""
    tables = {}
    for split in ("train", "valid", "test"):
        path = find_file(root, f"img{split}_Abnormality_and_Location_Labels.csv")
        rows = read_csv(path, ["NoteAcc_DEID"])
        header = list(rows[0]) if rows else []
        groups = [[c for c in header if c.split("*")[0] == name] for name in RADCHEST_CLASSES]
        absent = [name for name, cols in zip(RADCHEST_CLASSES, groups) if not cols]
        if absent:
            raise BadInput(f"{path}: no '<abnormality>*<location>' column for {absent}")
        values = [label_matrix(rows, cols, path).max(1) for cols in groups]
        ids = [r["NoteAcc_DEID"] for r in rows]
        tables[split] = (ids, np.stack(values, 1).reshape(len(ids), -1), ids)
    train, valid = tables.pop("train"), tables.pop("valid")
    tables["train"] = (train[0] + valid[0], np.concatenate([train[1], valid[1]]), train[2] + valid[2])
    return tables


def ratic_tables(root, split_file, seed=0):
    """One sample per series, carrying its patient's labels; patients split 2,500 / 647 at random once, saved
    to `split_file` and reused by every later run."""
    label_path, series_path = find_file(root, "train.csv"), find_file(root, "train_series_meta.csv")
    patients = {r["patient_id"]: r for r in read_csv(label_path, ["patient_id", *RATIC_COLUMNS])}
    series = read_csv(series_path, ["patient_id", "series_id"])
    if os.path.exists(split_file):
        split_of = {r["patient_id"]: r["split"] for r in read_csv(split_file, ["patient_id", "split"])}
        if set(split_of) != set(patients):
            raise BadInput(f"{split_file}: its patients differ from {label_path}; delete it to draw a new split")
    else:
        order = np.random.default_rng(seed).permutation(sorted(patients))
        n_test = round(len(order) * RATIC_SPLIT[1] / sum(RATIC_SPLIT))
        split_of = {p: "test" if i < n_test else "train" for i, p in enumerate(order)}
        with open(split_file + ".tmp", "w", newline="") as f:
            csv.writer(f).writerows([["patient_id", "split"], *sorted(split_of.items())])
        os.replace(split_file + ".tmp", split_file)
    unknown = [s["patient_id"] for s in series if s["patient_id"] not in patients]
    if unknown:
        raise BadInput(f"{series_path}: patient(s) {unknown[:5]} have no row in {label_path}")
    tables = {}
    for split in ("train", "test"):
        chosen = [s for s in series if split_of[s["patient_id"]] == split]
        tables[split] = ([f"{s['patient_id']}_{s['series_id']}" for s in chosen],
                         label_matrix([patients[s["patient_id"]] for s in chosen], RATIC_COLUMNS, label_path),
                         [s["patient_id"] for s in chosen])
    return tables


def hold_out(tables, fraction):
    """Move a fraction of the training groups (patients) to a validation split, chosen by a stable hash."""
    ids, labels, groups = tables["train"]
    val = np.array([zlib.crc32(g.encode()) % 1000 < fraction * 1000 for g in groups])
    tables["train"] = ([i for i, v in zip(ids, val) if not v], labels[~val], [g for g, v in zip(groups, val) if not v])
    tables["val"] = ([i for i, v in zip(ids, val) if v], labels[val], [g for g, v in zip(groups, val) if v])


def build_datasets(args):
    """{split: CTDataset} and the task: region, classes (evaluated columns), structures, window, pad, crop."""
    region = "abdomen" if args.dataset == "ratic" else "chest"
    info = dict(region=region, task="ratic" if args.dataset == "ratic" else "multilabel", **REGIONS[region])
    in_memory = args.dataset == "synthetic" and not args.data_path
    if args.dataset == "synthetic":
        import synthetic
        info.update(classes=tuple(synthetic.SYNTHETIC_CLASSES), pad=synthetic.SYNTHETIC["pad"], crop=synthetic.SYNTHETIC["crop"])
        if in_memory:
            sizes = args.synthetic_cases or [synthetic.SYNTHETIC["sizes"][s] for s in ("train", "val", "test")]
            tables = {s: synthetic.synthetic_split(s, n) for s, n in zip(("train", "val", "test"), sizes)}
        else:  # phantoms written by `python synthetic.py --write DIR` and run through make_masks.py
            path = os.path.join(args.data_path, "labels.csv")
            rows = read_csv(path, ["case_id", "split", *info["classes"]])
            tables = {s: ([r["case_id"] for r in rows if r["split"] == s],
                          label_matrix([r for r in rows if r["split"] == s], info["classes"], path))
                      for s in ("train", "val", "test")}
    elif args.dataset == "ctrate":
        info["classes"], tables = tuple(CTRATE_CLASSES), ctrate_tables(args.data_path)
    elif args.dataset == "radchest":
        info["classes"], tables = tuple(RADCHEST_CLASSES), radchest_tables(args.data_path)
    else:
        os.makedirs(args.prep_dir, exist_ok=True)
        info["classes"] = tuple(RATIC_COLUMNS)
        tables = ratic_tables(args.data_path, os.path.join(args.prep_dir, "ratic_split.csv"), args.split_seed)
    if args.val_fraction and "val" not in tables:
        hold_out(tables, args.val_fraction)
    if args.crop:
        info["crop"] = tuple(args.crop)
        info["pad"] = tuple(max(p, c) for p, c in zip(info["pad"], args.crop))
    splits = {}
    for split, table in tables.items():
        cases, labels = table[0], (table[2] if in_memory else table[1])
        volumes = table[1] if in_memory else StoredVolumes(args.prep_dir, cases, args.seg, args.skip_missing)
        if not in_memory:
            cases, labels = [cases[i] for i in volumes.kept], labels[volumes.kept]
            if volumes.missing:
                print(f"{split}: skipped {len(volumes.missing)} case(s) without preprocessed files: "
                      + ", ".join(volumes.missing))
        if not cases:
            raise BadInput(f"the {split} split of {args.dataset} is empty"
                             + (f" (labels from {args.data_path}, volumes from {args.prep_dir})" if args.data_path else ""))
        splits[split] = CTDataset(cases, volumes, labels, info["pad"], info["crop"], train=split == "train",
                                  seed=args.seed, with_mask=args.seg, max_label=len(info["structures"]))
    return splits, info
