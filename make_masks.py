"""Preprocess CTs once and store what the segmenter says about their anatomy (paper §2.1).

    python make_masks.py --src ct/ --dst prep/                        # runs TotalSegmentator --fast
    python make_masks.py --src ct/ --dst prep/ --from-totalseg ts_seg/ts_total/
    python make_masks.py --src ct/ --dst prep/ --from-masks seg/ --label-map seg_labels.json   # any segmenter
    python make_masks.py --src ct/ --dst prep/ --shard 3/8          # 8 GPUs / a SLURM array

Every case found under --src (recursively; readers in ctkit/ct_io.py) is reoriented to RAS, resampled linearly
onto a 1.5 x 1.5 x 3 mm grid, clipped to [-1000, 1000] HU and stored as <dst>/ct/<case>.nii (int16,
uncompressed, so that training reads crops through a memory map). TotalSegmentator (task 'total', fast) then
runs on that CT and its whole label map (117 classes) is stored as <dst>/mask/<case>.nii (uint8, same grid,
the scheme's stamp in its NIfTI description; <dst>/labels.json holds the id -> name table; the folder's
layout is defined in ctkit/prep.py). Which structures a run learns is chosen when training
(`train.py --structures`), without a new mask run.

With --from-totalseg, existing TotalSegmentator multilabel files are taken instead; with --from-masks, the
label maps of any segmenter, with --label-map FILE.json naming each id ({"1": "liver", ...}). Either kind has
the CT's file name (case id) and lies on the CT's grid (for header-less .npz inputs: in the CT's orientation
and shape); it is resampled with nearest neighbour.

Quality control: <dst>/qc/<case>.json per case and <dst>/masks_summary.csv (structure volumes in ml, the
scan's extent, missing / tiny / edge-touching structures; which structures: ctkit/mask_qc.py, --region
narrows TotalSegmentator's to that region's), rewritten atomically as cases finish; --preview N writes
<dst>/preview/<case>.png (three orthogonal slices with the mask) for N cases. Finished cases are skipped,
files are written atomically, and unreadable inputs are reported at the end (exit status 1).
"""

import dataclasses
import fnmatch
import os
import re
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from ctkit import ct_io, mask_qc, prep, totalseg, utils
from ctkit.regions import REGIONS
from ctkit.utils import BadInput, flag

PREFETCH = 2  # cases read ahead of the network, and written behind it
SUMMARY_SECONDS = 60  # masks_summary.csv is rewritten at most this often while cases finish


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command line, declared once (utils.flag) and resolved once (the metadata CSVs and the label map
    are read by prepare). from_masks: the folder of existing label maps (--from-masks, or --from-totalseg's
    with TotalSegmentator's scheme), None to segment."""

    src: Path = flag(None, "folder searched recursively for CTs", type=Path, required=True)
    dst: Path = flag(None, "output folder (ct/, mask/, qc/)", type=Path, required=True)
    region: str | None = flag(None, "QC and previews: this region's structures", choices=tuple(REGIONS))
    from_totalseg: Path | None = flag(None, "existing TotalSegmentator multilabel outputs", type=Path)
    from_masks: Path | None = flag(None, "existing label maps of another segmenter", type=Path)
    label_map: Path | None = flag(None, "with --from-masks: JSON {id: class name}", type=Path)
    metadata: tuple | None = flag(
        None, "CT-RATE metadata CSV(s) for the original (not _fixed) files", nargs="+"
    )
    exclude: tuple | None = flag(None, "skip matching paths", action="append", metavar="GLOB")
    device: str = flag("gpu", "TotalSegmentator device: gpu, gpu:N, cpu, mps")
    engine: str = flag(
        "predictor",
        "model loaded once (default), or TotalSegmentator's per-case call",
        choices=("predictor", "totalsegmentator"),
    )
    shard: str = flag("0/1", "I/N: process the cases whose id hashes to I mod N")
    preview: int = flag(0, "write PNG previews of N cases", type=int, metavar="N")


def find_cases(src, skip=(), exclude=()):
    """{case id: (kind, path)}: every NIfTI, .npz and DICOM series folder under src, except in the `skip`
    folders (the output, the TotalSegmentator maps), in make_masks.py outputs, and paths (relative to src)
    matching an `exclude` glob."""
    skip = {Path(p).resolve() for p in skip if p}

    def excluded(path):
        return any(fnmatch.fnmatch(path.relative_to(src).as_posix(), g) for g in exclude)

    cases, seen = {}, set()
    for root, dirs, files in os.walk(src, followlinks=True):  # a linked series folder is an input too
        root = Path(root)
        if root.resolve() in seen:  # a link back up the tree: walked already
            dirs[:] = []
            continue
        seen.add(root.resolve())
        dirs[:] = sorted(d for d in dirs if (root / d).resolve() not in skip and not prep.is_prep(root / d))
        for name in sorted(files):
            kind = "nifti" if name.endswith((".nii", ".nii.gz")) else "npz" if name.endswith(".npz") else None
            if kind is None or excluded(root / name):
                continue
            case = prep.case_id(root / name)
            if case in cases:
                example = (root / name).relative_to(src).parent.as_posix()
                raise BadInput(
                    f"two inputs give case id {case}: {cases[case][1]} and {root / name}. Restrict the "
                    "inputs with --exclude PATTERN (a glob on paths below --src, repeatable), e.g. "
                    f"--exclude '{example}/*', or point --src at the volumes' own folder"
                )
            cases[case] = (kind, root / name)
        others = [name for name in files if not name.endswith((".nii", ".nii.gz", ".npz"))]
        if others and not excluded(root) and any(ct_io.is_dicom(root / name) for name in others):
            case = prep.case_id(root)
            if case in cases:
                raise BadInput(f"two inputs give case id {case}: {cases[case][1]} and {root}")
            cases[case] = ("dicom", root)
    return cases


def in_shard(case, shard):
    """`shard` "I/N": a stable hash of the case id decides, so shards never overlap whatever they list."""
    index, count = (int(v) for v in shard.split("/"))
    return zlib.crc32(case.encode()) % count == index


# ----------------------------------------------------------------------------- one case


def given_map(case, kind, hu, affine, s, map_files, table):
    """An existing label map of the case, as (labels, affine) on which it can be resampled; every label must
    be one of the scheme's."""
    if case not in map_files:
        raise ValueError(f"no label map named {case}.nii[.gz] under {s.from_masks}")
    seg_img = nib.load(map_files[case])
    values = np.unique(np.asanyarray(seg_img.dataobj))
    unknown = [v for v in values.tolist() if v != 0 and int(v) not in table]
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError(
            f"{map_files[case]}: label values must be whole numbers, found {values[:5].tolist()}"
        )
    if unknown or values.min() < 0 or values.max() > 254:
        shown = unknown[:5] or values.tolist()[:5]
        raise ValueError(f"{map_files[case]}: labels {shown} are not in the scheme (--label-map)")
    seg = np.asanyarray(seg_img.dataobj).astype(np.uint8)
    if kind == "npz":  # no header: origin and spacing are arbitrary, orientation and shape must match
        try:
            return ct_io.reorient_like(seg, seg_img.affine, hu.shape, affine), affine
        except ValueError as error:
            raise ValueError(f"{map_files[case]}: {error}") from None
    if not ct_io.same_voxels(seg_img.shape, seg_img.affine, hu.shape, affine):
        theirs, ours = np.round(seg_img.affine, 3).tolist(), np.round(affine, 3).tolist()
        raise ValueError(
            f"{map_files[case]}: its grid {seg_img.shape} {theirs} is not the CT's {hu.shape} {ours}"
        )
    return seg, seg_img.affine


def load(case, s, inputs, kind, path):
    """The CPU work before the network (a reader thread): read and resample the CT, and with an existing label
    map resample that too. Returns (ct, affine, mask or None)."""
    hu, affine = ct_io.read_case(kind, path, inputs.metadata)
    ct, out_affine = ct_io.preprocess_ct(hu, affine)
    if not s.from_masks:
        return ct, out_affine, None
    seg, seg_affine = given_map(case, kind, hu, affine, s, inputs.map_files, inputs.table)
    return ct, out_affine, ct_io.resample(seg, seg_affine, ct.shape, out_affine, 0, 0)


def save(case, ct, affine, mask, s, inputs):
    """The CPU work after it (a writer thread): the CT, its QC record, then the mask, whose presence (with the
    scheme's stamp) marks the case as done (prep.write_case)."""
    qc = mask_qc.case_row(case, mask, affine, inputs.qc_groups)
    prep.write_case(s.dst, case, ct, affine, mask, inputs.stamp, qc)


def segmenter(s):
    """CT image -> TotalSegmentator's class ids: one predictor built once (--engine predictor, the default) or
    TotalSegmentator's own per-case call (--engine totalsegmentator, the reference); None with
    --from-totalseg."""
    if s.from_masks:
        return None
    if s.engine == "totalsegmentator":
        totalseg.disable_usage_stats()
        return lambda img: totalseg.reference(img, s.device)
    return totalseg.FastTotal(s.device)


def run_cases(todo, cases, s, inputs, progress):
    """Every case through load (reader thread, PREFETCH cases ahead), TotalSegmentator (this thread: the GPU
    never waits for a file) and save (writer thread); masks_summary.csv (all shards' cases) rewritten at most
    every SUMMARY_SECONDS; `progress`: the progress bar. Returns the failures, one line each."""
    segment, failures, writes = segmenter(s), [], deque()
    finished, last_summary = [], time.time()

    def fail(case, error):
        failures.append(f"{cases[case][1]}: {type(error).__name__}: {error}")
        progress.write(f"FAILED {failures[-1]}")

    def finish(case, future):
        nonlocal last_summary
        try:
            future.result()
            progress.update()
            finished.append(case)
            if time.time() - last_summary > SUMMARY_SECONDS:  # merge the cases finished since: no rereading
                mask_qc.write_summary(s.dst, finished)
                finished.clear()
                last_summary = time.time()
        except Exception as error:  # report, go on, fail at the end
            fail(case, error)

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:

        def read(case):
            return reader.submit(load, case, s, inputs, *cases[case])

        loads = deque((case, read(case)) for case in todo[:PREFETCH])
        for position, case in enumerate(todo):
            if position + PREFETCH < len(todo):
                loads.append((todo[position + PREFETCH], read(todo[position + PREFETCH])))
            try:
                ct, affine, mask = loads.popleft()[1].result()
                if mask is None:
                    mask = np.asanyarray(segment(nib.Nifti1Image(ct, affine)).dataobj).astype(np.uint8)
                writes.append((case, writer.submit(save, case, ct, affine, mask, s, inputs)))
            except (Exception, SystemExit) as error:  # TotalSegmentator exits on some inputs: a failed case
                fail(case, error)
            while writes and (len(writes) > PREFETCH or writes[0][1].done()):
                finish(*writes.popleft())
        while writes:
            finish(*writes.popleft())
    return failures


def get_args_parser():
    return utils.args_parser(Settings, __doc__)


class Inputs(NamedTuple):
    """What every case needs besides its CT: CT-RATE metadata rows, the existing label maps {case: path}, the
    scheme {id: name}, its mask stamp and the structures QC reports."""

    metadata: dict
    map_files: dict
    table: dict
    stamp: str
    qc_groups: dict


def resolve(args):
    """Settings from the command line; --from-totalseg is --from-masks with TotalSegmentator's scheme."""
    if args.from_totalseg and args.from_masks:
        raise BadInput("give --from-totalseg or --from-masks, not both")
    if bool(args.from_masks) != bool(args.label_map):
        raise BadInput("--from-masks needs --label-map FILE.json (and --label-map needs --from-masks)")
    if not os.path.isdir(args.src):
        raise BadInput(f"--src {args.src}: no such folder")
    shard = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not shard or not int(shard[1]) < int(shard[2]):
        raise BadInput(f"--shard {args.shard}: give I/N with 0 <= I < N, e.g. 0/4")
    utils.check_writable_folder(args.dst, "--dst")
    given = dict(vars(args), from_masks=args.from_masks or args.from_totalseg)
    given.update(metadata=tuple(args.metadata or ()), exclude=tuple(args.exclude or ()))
    return Settings(**given)


def prepare(s):
    """The cases of this shard and their Inputs, every input read and checked first; then writes (or checks)
    <dst>/labels.json and removes a killed run's temporary files."""
    cases = find_cases(s.src, skip=(s.dst, s.from_masks), exclude=s.exclude)
    mine = sorted(c for c in cases if in_shard(c, s.shard))
    if not mine:
        raise BadInput(f"no CT found under {s.src} for shard {s.shard} (NIfTI, .npz or DICOM series folders)")
    name, table = (
        (s.label_map.stem, prep.read_label_map(s.label_map)) if s.label_map else prep.totalseg_scheme()
    )
    map_files = {}
    for path in sorted(s.from_masks.rglob("*.nii*")) if s.from_masks else ():
        case = prep.case_id(path)
        if case in map_files:
            raise BadInput(f"two label maps for case {case}: {map_files[case]} and {path}")
        map_files[case] = path
    qc_groups = mask_qc.qc_structures(name, table, s.region)
    inputs = Inputs(
        ct_io.load_metadata(s.metadata), map_files, table, prep.mask_stamp(name, table), qc_groups
    )
    prep.write_scheme(s.dst, name, table)  # the first write
    prep.remove_temporaries(s.dst, lambda case: in_shard(case, s.shard))  # a killed run's, this shard's cases
    return cases, mine, inputs


def main(args):
    from tqdm import tqdm  # the progress bar: only when masks are made

    s = resolve(args)
    source = f"the maps in {s.from_masks}" if s.from_masks else f"TotalSegmentator ({s.engine}) on {s.device}"
    print(f"make_masks: {s.src} -> {s.dst}, masks: {source}, shard {s.shard}")
    cases, mine, inputs = prepare(s)
    todo = [c for c in mine if not prep.is_done(s.dst, c, inputs.stamp)]
    print(f"{len(cases)} cases under {s.src}; shard {s.shard}: {len(mine)}, {len(mine) - len(todo)} done")
    with tqdm(total=len(todo), unit="case") as progress:
        failures = run_cases(todo, cases, s, inputs, progress)
    mask_qc.write_summary(s.dst)
    window = REGIONS[s.region]["window"] if s.region else (-1000, 400)
    for case in [c for c in mine if prep.is_done(s.dst, c, inputs.stamp)][: s.preview]:
        mask_qc.write_preview(s.dst, case, inputs.qc_groups, window)
    if failures:
        raise BadInput(f"{len(failures)} of {len(todo)} case(s) failed:\n  " + "\n  ".join(failures))
    print(f"done: {len(mine)} cases in {s.dst}; quality control in {s.dst / mask_qc.SUMMARY}")


def cli(argv=None):
    """The command line: unusable input, or cases that failed (listed), end in a message and exit status 1."""
    try:
        main(get_args_parser().parse_args(argv))
    except BadInput as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":  # TotalSegmentator's workers are spawned: keep the entry point guarded
    cli()
