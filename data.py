"""Datasets, cropping and intensity preprocessing (paper §3.1, appendix A.2).

Arrays are (D, H, W) = (z, y, x) of a RAS-oriented volume (the paper writes sizes x × y × z: ctkit/regions).
Per sample the loader only copies an int16 window out of the stored volume (and the same window of the
mask); clipping and scaling to [-1, 1] happen on the training device (`ctkit/ct_io.normalize`), and so does
the --structures lookup (`CTDataset.seg_classes`). "Pad/crop to P, then a random (train) or centre (eval)
crop of C" is one window into the volume, padded where it leaves it.

Labels come from the files each dataset distributes (ctkit/labels.py); volumes and masks from the prepared
folder make_masks.py writes (ctkit/prep.py). `synthetic` is the phantom dataset of ctkit/synthetic.py, in
memory or written to files. Both arms of a comparison get the same cases and the same crops: the case set
never depends on whether the masks are read (`build_datasets`).
"""

import dataclasses
import os
import warnings
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from ctkit import labels, prep, structures, synthetic, utils
from ctkit.ct_io import AIR_HU
from ctkit.regions import REGIONS
from ctkit.utils import BadInput

OPEN_VOLUMES = 64  # memory maps (CT + mask) a process keeps open; each costs one file descriptor


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run learns and how its inputs are prepared. Saved in checkpoints as a plain dict (to_dict), so
    prediction rebuilds the same model and preprocessing without the training command line, and a resumed run
    checks it learns the same (the structures included)."""

    dataset: str
    kind: str  # "multilabel": a sigmoid per class; "ratic": the heads of eq. 2 (model.py)
    region: str
    classes: tuple  # evaluated columns
    structures: tuple  # the seg classes 1..len(structures); 0 is background
    window: tuple  # HU clip range
    pad: tuple
    crop: tuple
    structure_ids: tuple = ()  # per seg class, the stored labels it holds (ctkit/structures.py)
    scheme: str = ""  # the stamp of the stored masks' label scheme (ctkit/prep.py); "" for in-memory phantoms

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        def nested(v):  # JSON's lists -> the tuples the Task holds
            return tuple(nested(x) for x in v) if isinstance(v, list | tuple) else v

        return cls(**{k: nested(v) for k, v in d.items()})


def region_of(dataset, region=None):
    """The paper's region of a dataset; a custom dataset's is given (--region)."""
    if dataset == "custom":
        if region not in REGIONS:
            raise BadInput(f"--dataset custom needs --region, one of {tuple(REGIONS)}")
        return region
    return "abdomen" if dataset == "ratic" else "chest"


def make_task(dataset, crop=None, pad=None, region=None, classes=None, anatomy=None):
    """The Task of a dataset. A --crop other than the paper's scales the pad box with it (the paper's pad/crop
    ratio per axis), so that a random crop still mostly covers the patient; --pad sets it explicitly.
    classes: a custom dataset's findings; anatomy: the run's Anatomy, default the region's paper structures
    (in the phantoms' scheme for phantoms, else by name)."""
    region = region_of(dataset, region)
    geometry = {k: v for k, v in REGIONS[region].items() if k != "structures"}
    if dataset == "synthetic":
        geometry.update(pad=synthetic.SYNTHETIC["pad"], crop=synthetic.SYNTHETIC["crop"])
    if crop:
        ratio = [p / c for p, c in zip(geometry["pad"], geometry["crop"])]
        geometry.update(crop=tuple(crop), pad=tuple(int(np.ceil(c * r)) for c, r in zip(crop, ratio)))
    if pad:
        if any(p < c for p, c in zip(pad, geometry["crop"])):
            raise BadInput(f"--pad {tuple(pad)} is smaller than the crop {geometry['crop']}")
        geometry.update(pad=tuple(pad))
    if anatomy is None:
        anatomy = phantom_anatomy("paper", region) if dataset == "synthetic" else paper_by_name(region)
    kind = "ratic" if dataset == "ratic" else "multilabel"
    classes = tuple(classes or labels.CLASSES[dataset])
    names, ids, stamp = anatomy.names, anatomy.ids, anatomy.stamp
    return Task(dataset, kind, region, classes, names, **geometry, structure_ids=ids, scheme=stamp)


class Anatomy(NamedTuple):
    """--structures resolved on a label scheme (ctkit/structures.py): the seg classes' names, the stored ids
    each holds, the scheme's stamp ("" without stored masks) and the lookup table stored label -> seg class
    (None where the stored labels are the classes already)."""

    names: tuple
    ids: tuple
    stamp: str = ""
    lut: np.ndarray | None = None


def paper_by_name(region):
    """The paper's structures of the region by name only, for a task that never reads masks."""
    return Anatomy(REGIONS[region]["structures"], ())


def phantom_anatomy(spec, region):
    """The Anatomy of a spec on phantoms made in memory (their labels are synthetic.SCHEME's ids): no lookup
    table where the run's classes are those labels already."""
    names, ids = structures.parse(spec, synthetic.SCHEME, region)
    lut, n = structures.lookup_table(ids, synthetic.SCHEME), len(synthetic.SCHEME) + 1
    return Anatomy(names, ids, "", None if np.array_equal(lut[:n], np.arange(n)) else lut)


def anatomy(spec, source, region, with_mask=True):
    """The Anatomy of --structures SPEC on the source's stored masks, reading its prepared folder's
    labels.json once (the phantoms' scheme for phantoms made in memory). A run without masks whose folder
    has no labels.json, or a scheme without the spec's structures, gets the paper's structures by name (the
    task records them; nothing reads them)."""
    if source.dataset == "synthetic" and not source.data_path:
        return phantom_anatomy(spec, region)
    prep.check_prep_dir(source.prep_dir, source.data_path)
    if not with_mask and not os.path.exists(os.path.join(source.prep_dir, prep.SCHEME)):
        return paper_by_name(region)
    _, table, stamp = prep.read_scheme(source.prep_dir)
    try:
        names, ids = structures.parse(spec, table, region)
    except BadInput:
        if with_mask:
            raise
        return paper_by_name(region)
    return Anatomy(names, ids, stamp, structures.lookup_table(ids, table))


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
    """volumes[i] -> (ct, mask or None): np.memmap arrays (D, H, W) of the prepared <prep>/ct/<case>.nii and
    <prep>/mask/<case>.nii (NIfTI's x-fastest order is C order for (z, y, x)). Every header is read, and CT
    and mask grids compared, once here, so that bad files fail before training starts. Each process
    (DataLoader worker) keeps its most recently used maps open, up to OPEN_VOLUMES cases.

    `require` names the files a case must have to be kept (with skip_missing; else one missing stops the run),
    `read_mask` whether the masks are opened; stamp: the mask stamp they must carry (prep.mask_stamp)."""

    def __init__(self, prep_dir, case_ids, require, read_mask, skip_missing=False, stamp=None):
        self.entries, self.kept, self.missing, self.maps = [], [], [], OrderedDict()
        for position, case in enumerate(case_ids):
            absent = [prep.case_path(prep_dir, sub, case) for sub in require]
            absent = [p for p in absent if not os.path.exists(p)]
            if absent:
                self.missing.append(absent[0])
                continue
            paths = [prep.case_path(prep_dir, sub, case) for sub in (prep.CT, prep.MASK)[: 1 + read_mask]]
            layouts = [prep.nifti_layout(p) for p in paths]
            prep.check_layouts(paths, layouts, stamp)
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
        lut=None,
        groups=None,
    ):
        self.case_ids, self.volumes, self.labels = list(case_ids), volumes, np.asarray(labels, np.float32)
        self.groups = list(groups) if groups is not None else self.case_ids  # patients
        self.pad_size, self.crop_size, self.train, self.seed = pad_size, crop_size, train, seed
        self.with_mask, self.lut = with_mask, lut  # lut: stored label -> seg class (None: the same)
        self.device_luts, self.unchecked = {}, []  # the lut on each device met; flags not yet read back

    def __len__(self):
        return len(self.case_ids)

    def __getitem__(self, key):
        epoch, index = divmod(int(key), len(self))
        ct, mask = self.volumes[index]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        starts = window_start(ct.shape, self.pad_size, self.crop_size, rng)
        # the windows are read-only views (torch warns about them); the batch collation copies them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sample = {"ct": torch.from_numpy(read_window(ct, starts, self.crop_size, AIR_HU))[None]}
            if self.with_mask:
                sample["mask"] = torch.from_numpy(read_window(mask, starts, self.crop_size, 0))  # as stored
        sample.update(label=torch.from_numpy(self.labels[index]), index=index)
        return sample

    def seg_classes(self, masks, indices, check=True):
        """The run's seg classes of a batch of stored masks (B, D, H, W) uint8, looked up where the batch is
        (on the device, off the loaders' per-sample path). Cases holding a stored label outside the folder's
        scheme are flagged on the device; check_labels raises for them, here unless check=False (training
        checks when it reads its log back, before any checkpoint: no device synchronisation per step)."""
        if masks is None or self.lut is None:
            return masks
        if masks.device not in self.device_luts:
            self.device_luts[masks.device] = torch.from_numpy(self.lut).to(masks.device)
        classes = torch.take(self.device_luts[masks.device], masks.long())  # (B, D, H, W) uint8
        unknown = classes == structures.UNKNOWN
        self.unchecked.append((indices, unknown.flatten(1).any(1)))
        if check:
            self.check_labels()
        return classes.masked_fill_(unknown, 0)  # background until checked: the loss never sees the flag

    def check_labels(self):
        """One error naming the mask file of the first case flagged by seg_classes since the last check."""
        unchecked, self.unchecked = self.unchecked, []
        for indices, unknown in unchecked:
            if unknown.any():  # reads the flags back from the device
                index = int(indices[int(unknown.int().argmax())])
                where = getattr(self.volumes, "mask_path", lambda i: self.case_ids[i])(index)
                raise BadInput(
                    f"{where}: a mask label that is not in the folder's label scheme ({prep.SCHEME})"
                )

    def __getstate__(self):  # a DataLoader worker started by spawn gets no device tensors
        return {**self.__dict__, "device_luts": {}, "unchecked": []}


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


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a run's cases come from: the label files (data_path; a custom dataset's labels CSV),
    make_masks.py's output (prep_dir), and how splits are made. data_path None with dataset "synthetic":
    phantoms made in memory, synthetic_cases of them per split (default synthetic.SYNTHETIC's sizes), of
    synthetic_variant (synthetic.VARIANTS).
    split_file: where a custom dataset's drawn split is kept (the run folder's split.csv)."""

    dataset: str
    data_path: str | None
    prep_dir: str | None
    val_fraction: float = 0.0
    split_seed: int = 0
    skip_missing: bool = False
    synthetic_cases: tuple | None = None
    synthetic_variant: str = "default"
    labels: str | None = None
    test_fraction: float | None = None
    split_file: str | None = None

    @classmethod
    def of_run(cls, settings, run_folder):
        """The Source of a run from its settings (train.Settings as a dict, or its config.json): a custom
        dataset's drawn split is kept in the run folder."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"split_file"}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in fields}
        custom = settings["dataset"] == "custom"
        return cls(**given, split_file=os.path.join(run_folder, "split.csv") if custom else None)


def label_tables(source):
    """{split: (case ids, labels, patients)} of a dataset on disk, a validation split held out if asked."""
    if source.dataset == "custom":
        return labels.custom_tables(
            source.labels,
            source.prep_dir,
            source.split_file,
            source.split_seed,
            source.val_fraction,
            source.test_fraction,
        )
    tables = labels.tables(source.dataset, source.data_path, source.prep_dir, source.split_seed)
    if source.val_fraction and "val" not in tables:
        labels.hold_out(tables, source.val_fraction)
    return tables


def build_datasets(task, source, seed, with_mask, lut=None):
    """{split: CTDataset} of the task's dataset; with_mask: the samples carry the stored masks (--seg), which
    CTDataset.seg_classes maps to the task's seg classes by `lut` (the run's Anatomy.lut).

    The cases are the same with and without masks: with --skip-missing a case is kept when it has its CT and,
    if the prepared folder has a mask/ folder, its mask, whether or not this run reads masks."""

    def make(cases, volumes, y, split, groups=None):
        options = dict(with_mask=with_mask, lut=lut, groups=groups)
        return CTDataset(cases, volumes, y, task.pad, task.crop, split == "train", seed, **options)

    if source.dataset == "synthetic" and not source.data_path:  # phantoms in memory, sized to the pad box
        sizes = source.synthetic_cases or [synthetic.SYNTHETIC["sizes"][s] for s in ("train", "val", "test")]
        return {
            s: make(*synthetic.synthetic_split(s, n, pad=task.pad, variant=source.synthetic_variant), s)
            for s, n in zip(("train", "val", "test"), sizes)
        }
    prep.check_prep_dir(source.prep_dir, source.data_path)
    tables = label_tables(source)
    has_masks = os.path.isdir(os.path.join(source.prep_dir, prep.MASK))
    require = (prep.CT, prep.MASK) if with_mask or (has_masks and source.skip_missing) else (prep.CT,)
    splits, stamp = {}, task.scheme if with_mask else None
    for split, (cases, y, groups) in tables.items():
        volumes = StoredVolumes(source.prep_dir, cases, require, with_mask, source.skip_missing, stamp)
        if volumes.missing:
            print(
                f"{split}: skipped {len(volumes.missing)} case(s) without a CT or mask (the same with and "
                "without --seg): " + ", ".join(volumes.missing)
            )
        if not volumes.kept:
            raise BadInput(
                f"the {split} split of {source.dataset} is empty (labels from "
                f"{source.labels or source.data_path}, volumes in {source.prep_dir})"
            )
        keep = volumes.kept
        splits[split] = make([cases[i] for i in keep], volumes, y[keep], split, [groups[i] for i in keep])
    return splits


def make_loader(dataset, train, batch_size, workers=0, seed=0, pin_memory=False):
    """Training: a seeded DistributedSampler inside EpochSampler (keys carry the epoch; drop_last).
    Evaluation: every case exactly once, split over the processes (no padding duplicates in the metrics)."""
    rank, world_size = utils.get_rank(), utils.get_world_size()
    if train:
        shuffled = torch.utils.data.DistributedSampler(dataset, world_size, rank, seed=seed, drop_last=True)
        sampler = EpochSampler(shuffled, len(dataset), batch_size)
    else:
        sampler = list(range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )


def centre_masks(dataset, limit=None):
    """The centre-crop masks (D, H, W) uint8 of a CTDataset's cases (the evaluated crops' frame) in its seg
    classes, evenly spaced over the cases if there are more than `limit`."""
    n = len(dataset.case_ids)
    picks = range(n) if not limit or n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    for i in picks:
        mask = dataset.volumes[i][1]
        starts = window_start(mask.shape, dataset.pad_size, dataset.crop_size)
        window = torch.from_numpy(np.array(read_window(mask, starts, dataset.crop_size, 0)))  # a copy
        yield dataset.seg_classes(window[None], [i])[0].numpy()  # the seg classes, as in training
