"""Datasets, cropping and intensity preprocessing (paper §3.1, appendix A.2).

Arrays are (D, H, W) = (z, y, x) of a RAS-oriented volume; the paper's sizes are written x × y × z, so its
"240x240x120 pad, 192x192x96 crop" is (120, 240, 240) and (96, 192, 192) here.

Per sample the loader only copies an int16 window out of the stored volume (and the same window of the
mask); clipping and scaling to [-1, 1] happen on the training device (`normalize`). "Pad/crop to P, then a
random (train) or centre (eval) crop of C" is one window into the volume, padded where it leaves it.

Labels come from the files each dataset distributes (labels.py); volumes and masks from make_masks.py's output
(<prep>/ct, <prep>/mask). `synthetic` is the phantom dataset of synthetic.py, in memory or written to files.
"""

import dataclasses
import os
import warnings
import zlib
from collections import OrderedDict

import numpy as np
import torch

import labels
import utils
from ct_io import AIR_HU, check_layouts, check_prep_dir, nifti_layout
from utils import BadInput

# fmt: off
REGIONS = {  # paper Table 3; sizes (D, H, W)
    "chest": dict(window=(-1000, 200), pad=(120, 240, 240), crop=(96, 192, 192), structures=(
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
        "lung_middle_lobe_right", "lung_lower_lobe_right", "heart")),
    "abdomen": dict(window=(-150, 250), pad=(192, 256, 256), crop=(160, 192, 176), structures=(
        "liver", "spleen", "kidney_left", "kidney_right", "bowel")),
}
# fmt: on
OPEN_VOLUMES = 64  # memory maps (CT + mask) a process keeps open; each costs one file descriptor


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run learns and how its inputs are prepared. Saved in checkpoints as a plain dict (to_dict), so
    prediction rebuilds the same model and preprocessing without the training command line."""

    dataset: str
    kind: str  # "multilabel": a sigmoid per class; "ratic": the heads of eq. 2 (model.py)
    region: str
    classes: tuple  # evaluated columns
    structures: tuple  # mask labels 1..len(structures); 0 is background
    window: tuple  # HU clip range
    pad: tuple
    crop: tuple

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def make_task(dataset, crop=None, pad=None):
    """The Task of a dataset. A --crop other than the paper's scales the pad box with it (the paper's pad/crop
    ratio per axis), so that a random crop still mostly covers the patient; --pad sets it explicitly."""
    region = "abdomen" if dataset == "ratic" else "chest"
    geometry = dict(REGIONS[region])
    if dataset == "synthetic":
        import synthetic

        geometry.update(pad=synthetic.SYNTHETIC["pad"], crop=synthetic.SYNTHETIC["crop"])
    if crop:
        ratio = [p / c for p, c in zip(geometry["pad"], geometry["crop"])]
        geometry.update(crop=tuple(crop), pad=tuple(int(np.ceil(c * r)) for c, r in zip(crop, ratio)))
    if pad:
        if any(p < c for p, c in zip(pad, geometry["crop"])):
            raise BadInput(f"--pad {tuple(pad)} is smaller than the crop {geometry['crop']}")
        geometry.update(pad=tuple(pad))
    kind = "ratic" if dataset == "ratic" else "multilabel"
    return Task(dataset, kind, region, tuple(labels.CLASSES[dataset]), **geometry)


def mask_stamp(region):
    """What make_masks.py writes into every mask's NIfTI description, checked for every case at training: the
    region and a checksum of its label scheme (masks of the other region share labels 1-5)."""
    scheme = ",".join(REGIONS[region]["structures"])
    return f"make_masks region={region} labels={zlib.crc32(scheme.encode()):08x}"


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
    """volume[starts : starts + size], filled where it leaves the volume. Inside the volume this is a view (of
    a memory map, for stored volumes): the batch collation then makes the one copy of it."""
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


class StoredVolumes:
    """volumes[i] -> (ct, mask or None): np.memmap arrays (D, H, W) of make_masks.py's <prep>/ct/<case>.nii
    and <prep>/mask/<case>.nii (NIfTI's x-fastest order is C order for (z, y, x)). Every header is read, and
    CT and mask grids compared, once here, so that bad files fail before training starts. Each process
    (DataLoader worker) keeps its most recently used maps open, up to OPEN_VOLUMES cases."""

    def __init__(self, prep_dir, case_ids, with_mask, skip_missing=False, stamp=None):
        self.entries, self.kept, self.missing, self.maps = [], [], [], OrderedDict()
        for position, case in enumerate(case_ids):
            paths = [os.path.join(prep_dir, sub, f"{case}.nii") for sub in ("ct", "mask")[: 1 + with_mask]]
            absent = [p for p in paths if not os.path.exists(p)]
            if absent:
                self.missing.append(absent[0])
                continue
            layouts = [nifti_layout(p) for p in paths]
            check_layouts(paths, layouts, stamp)
            self.entries.append(list(zip(paths, layouts)))
            self.kept.append(position)
        if self.missing and not skip_missing:
            raise BadInput(
                f"{len(self.missing)} labelled case(s) have no preprocessed volume or mask, e.g. "
                f"{self.missing[0]} (run make_masks.py first, or pass --skip-missing)"
            )

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        volumes = self.maps.pop(i, None)
        if volumes is None:
            volumes = [
                np.memmap(path, v["dtype"], "r", v["offset"], v["shape"]) for path, v in self.entries[i]
            ]
        self.maps[i] = volumes  # most recently used last
        while len(self.maps) > OPEN_VOLUMES:
            self.maps.popitem(last=False)  # unmapped once no window view refers to it any more
        return volumes[0], volumes[1] if len(volumes) > 1 else None

    def mask_path(self, i):
        return self.entries[i][-1][0]

    def __getstate__(self):  # a copy for a worker process opens its own maps
        return {**self.__dict__, "maps": OrderedDict()}


class CTDataset(torch.utils.data.Dataset):
    """Samples {"ct": int16 (1, D, H, W), "mask": uint8 (D, H, W) with_mask, "label": float32 (K,), "index"}.

    `volumes[i]` gives (ct, mask or None) for case i: arrays or memory maps with the same (D, H, W) grid.
    Keys from `EpochSampler` encode (epoch, case), so every random crop is a pure function of
    (seed, epoch, case): reproducible, independent of worker count and resumable mid-run."""

    def __init__(
        self,
        case_ids,
        volumes,
        labels,
        pad_size,
        crop_size,
        train,
        seed=0,
        with_mask=False,
        max_label=255,
        groups=None,
    ):
        self.case_ids, self.volumes, self.labels = list(case_ids), volumes, np.asarray(labels, np.float32)
        self.groups = list(groups) if groups is not None else self.case_ids  # patients
        self.pad_size, self.crop_size, self.train, self.seed = pad_size, crop_size, train, seed
        self.with_mask, self.max_label = with_mask, max_label

    def __len__(self):
        return len(self.case_ids)

    def __getitem__(self, key):
        epoch, index = divmod(int(key), len(self))
        ct, mask = self.volumes[index]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        starts = window_start(ct.shape, self.pad_size, self.crop_size, rng)
        # the windows are read-only views (torch warns about them); collate() copies them into the batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sample = {"ct": torch.from_numpy(read_window(ct, starts, self.crop_size, AIR_HU))[None]}
            if self.with_mask:
                sample["mask"] = torch.from_numpy(read_window(mask, starts, self.crop_size, 0))
        sample.update(label=torch.from_numpy(self.labels[index]), index=index)
        return sample

    def collate(self, samples):
        """Stack the samples (the one copy of each window); check the mask labels on the contiguous batch."""
        batch = torch.utils.data.default_collate(samples)
        if self.with_mask and batch["mask"].max() > self.max_label:
            index = int(batch["index"][batch["mask"].flatten(1).amax(1).argmax()])
            where = getattr(self.volumes, "mask_path", lambda i: self.case_ids[i])(index)
            raise BadInput(
                f"{where}: mask label {int(batch['mask'].max())} is outside this region's "
                f"scheme 0..{self.max_label} (made for another --region?)"
            )
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
        return (self.epoch * self.n + i for i in list(self.sampler)[self.skip :])

    def __len__(self):
        return len(self.sampler) - self.skip


def make_loader(dataset, args, train):
    """Training: a seeded DistributedSampler inside EpochSampler (keys carry the epoch; drop_last).
    Evaluation: every case exactly once, split over the processes (no padding duplicates in the metrics)."""
    rank, world_size = utils.get_rank(), utils.get_world_size()
    if train:
        shuffled = torch.utils.data.DistributedSampler(
            dataset, world_size, rank, seed=args.seed, drop_last=True
        )
        sampler = EpochSampler(shuffled, len(dataset), args.batch_size)
    else:
        sampler = list(range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        dataset,
        args.batch_size,
        sampler=sampler,
        drop_last=train,
        collate_fn=dataset.collate,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=args.device.startswith("cuda"),
    )


def make_loaders(splits, args):
    """(training loader, {"val"/"test": evaluation loader}) of the splits there are."""
    evaluation = {
        split: make_loader(splits[split], args, train=False) for split in ("val", "test") if split in splits
    }
    return make_loader(splits["train"], args, train=True), evaluation


def build_datasets(args):
    """{split: CTDataset} and the run's Task."""
    task = make_task(args.dataset, args.crop, args.pad)

    def make(cases, volumes, y, split, groups=None):
        options = dict(with_mask=args.seg, max_label=len(task.structures), groups=groups)
        return CTDataset(cases, volumes, y, task.pad, task.crop, split == "train", args.seed, **options)

    if (
        args.dataset == "synthetic" and not args.data_path
    ):  # phantoms generated in memory, sized to the pad box
        import synthetic

        sizes = args.synthetic_cases or [synthetic.SYNTHETIC["sizes"][s] for s in ("train", "val", "test")]
        return {
            s: make(*synthetic.synthetic_split(s, n, pad=task.pad), s)
            for s, n in zip(("train", "val", "test"), sizes)
        }, task
    check_prep_dir(args.prep_dir, args.data_path)
    tables = labels.tables(args)
    if args.val_fraction and "val" not in tables:
        labels.hold_out(tables, args.val_fraction)
    splits, stamp = {}, mask_stamp(task.region) if args.seg else None
    for split, (cases, y, groups) in tables.items():
        volumes = StoredVolumes(args.prep_dir, cases, args.seg, args.skip_missing, stamp)
        if volumes.missing:
            print(
                f"{split}: skipped {len(volumes.missing)} case(s) without files: "
                + ", ".join(volumes.missing)
            )
        if not volumes.kept:
            raise BadInput(f"the {split} split of {args.dataset} is empty (labels from {args.data_path}, "
                           f"volumes from {args.prep_dir})")  # fmt: skip
        keep = volumes.kept
        splits[split] = make([cases[i] for i in keep], volumes, y[keep], split, [groups[i] for i in keep])
    return splits, task
