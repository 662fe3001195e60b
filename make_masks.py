"""Preprocess CTs once and make their TotalSegmentator anatomy masks (paper §2.1).

    python make_masks.py --src ct/ --dst prep/ --region chest               # runs TotalSegmentator --fast
    python make_masks.py --src ct/ --dst prep/ --region chest --from-totalseg ts_seg/ts_total/
    python make_masks.py --src ct/ --dst prep/ --region abdomen --shard 3/8   # 8 GPUs / a SLURM array

Every case found under --src (recursively; readers in ctkit/ct_io.py) is reoriented to RAS, resampled linearly
onto a 1.5 x 1.5 x 3 mm grid, clipped to [-1000, 1000] HU and stored as <dst>/ct/<case>.nii (int16,
uncompressed, so that training reads crops through a memory map). TotalSegmentator (task 'total', fast) then
runs on that CT, and the region's structures are merged into <dst>/mask/<case>.nii (uint8, same grid, the
region and label scheme in its NIfTI description; the folder's layout is defined in ctkit/prep.py):
  chest:   1 lung_upper_lobe_left 2 lung_lower_lobe_left 3 lung_upper_lobe_right 4 lung_middle_lobe_right
           5 lung_lower_lobe_right 6 heart
  abdomen: 1 liver 2 spleen 3 kidney_left 4 kidney_right
           5 bowel (esophagus, stomach, duodenum, small_bowel, colon)
With --from-totalseg, existing TotalSegmentator multilabel files (same file name as the CT, on the CT's grid;
for header-less .npz inputs, in the CT's orientation and shape) are resampled with nearest neighbour instead.

Quality control: <dst>/qc/<case>.json per case and <dst>/masks_summary.csv (structure volumes in ml, the
scan's extent, missing / tiny / edge-touching structures), rewritten atomically as cases finish; --preview N
writes <dst>/preview/<case>.png (three orthogonal slices with the mask) for N cases. Finished cases are
skipped, files are written atomically, and unreadable inputs are reported at the end (exit status 1).
"""

import argparse
import dataclasses
import fnmatch
import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from ctkit import ct_io, mask_qc, prep, totalseg
from ctkit.regions import REGIONS
from ctkit.utils import BadInput

PREFETCH = 2  # cases read ahead of the network, and written behind it


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command line, resolved once (the metadata CSVs are read by prepare)."""

    src: Path
    dst: Path
    region: str
    from_totalseg: Path | None
    metadata: tuple
    exclude: tuple
    device: str
    engine: str
    shard: str
    preview: int


def find_cases(src, skip=(), exclude=()):
    """{case id: (kind, path)}: every NIfTI, .npz and DICOM series folder under src, except in the `skip`
    folders (the output, the TotalSegmentator maps), in make_masks.py outputs, and paths (relative to src)
    matching an `exclude` glob."""
    skip = {Path(p).resolve() for p in skip if p}
    excluded = lambda path: any(fnmatch.fnmatch(path.relative_to(src).as_posix(), g) for g in exclude)  # noqa: E731
    cases = {}
    for root, dirs, files in os.walk(src):
        root = Path(root)
        dirs[:] = sorted(d for d in dirs if (root / d).resolve() not in skip and not prep.is_prep(root / d))
        for name in sorted(files):
            kind = "nifti" if name.endswith((".nii", ".nii.gz")) else "npz" if name.endswith(".npz") else None
            if kind is None or excluded(root / name):
                continue
            case = name.split(".nii")[0] if kind == "nifti" else name[: -len(".npz")]
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
            case = f"{root.parent.name}_{root.name}"
            if case in cases:
                raise BadInput(f"two inputs give case id {case}: {cases[case][1]} and {root}")
            cases[case] = ("dicom", root)
    return cases


def in_shard(case, shard):
    """`shard` "I/N": a stable hash of the case id decides, so shards never overlap whatever they list."""
    index, count = (int(v) for v in shard.split("/"))
    return zlib.crc32(case.encode()) % count == index


# ----------------------------------------------------------------------------- one case


def totalseg_map(case, kind, hu, affine, s, totalseg_files):
    """An existing TotalSegmentator map of the case, as (labels, affine) on which it can be resampled."""
    if case not in totalseg_files:
        raise ValueError(f"no TotalSegmentator file named {case}.nii[.gz] under {s.from_totalseg}")
    seg_img = nib.load(totalseg_files[case])
    seg = np.asanyarray(seg_img.dataobj).astype(np.uint8)
    if kind == "npz":  # no header: origin and spacing are arbitrary, orientation and shape must match
        try:
            return ct_io.reorient_like(seg, seg_img.affine, hu.shape, affine), affine
        except ValueError as error:
            raise ValueError(f"{totalseg_files[case]}: {error}") from None
    if not ct_io.same_voxels(seg_img.shape, seg_img.affine, hu.shape, affine):
        theirs, ours = np.round(seg_img.affine, 3).tolist(), np.round(affine, 3).tolist()
        raise ValueError(
            f"{totalseg_files[case]}: its grid {seg_img.shape} {theirs} is not the CT's {hu.shape} {ours}"
        )
    return seg, seg_img.affine


def load(case, s, metadata, lut, totalseg_files, kind, path):
    """The CPU work before the network (a reader thread): read and resample the CT, and with --from-totalseg
    merge and resample its map. Returns (ct, affine, mask or None)."""
    hu, affine = ct_io.read_case(kind, path, metadata)
    ct, out_affine = ct_io.preprocess_ct(hu, affine)
    if not s.from_totalseg:
        return ct, out_affine, None
    seg, seg_affine = totalseg_map(case, kind, hu, affine, s, totalseg_files)
    return ct, out_affine, ct_io.resample(lut[seg], seg_affine, ct.shape, out_affine, 0, 0)


def save(case, ct, affine, mask, s):
    """The CPU work after it (a writer thread): the CT, its QC record, then the mask, whose presence (with the
    region's stamp) marks the case as done (prep.write_case)."""
    prep.write_case(s.dst, case, ct, affine, mask, s.region, mask_qc.case_row(case, mask, affine, s.region))


def segmenter(s):
    """CT image -> TotalSegmentator's class ids: one predictor built once (--engine predictor, the default) or
    TotalSegmentator's own per-case call (--engine totalsegmentator, the reference); None with
    --from-totalseg."""
    if s.from_totalseg:
        return None
    if s.engine == "totalsegmentator":
        totalseg.disable_usage_stats()
        return lambda img: totalseg.reference(img, s.device)
    return totalseg.FastTotal(s.device)


def run_cases(todo, cases, s, inputs, progress):
    """Every case through load (reader thread, PREFETCH cases ahead), TotalSegmentator (this thread: the GPU
    never waits for a file) and save (writer thread). Returns the failures, one line each."""
    segment, failures, writes = segmenter(s), [], deque()

    def fail(case, error):
        failures.append(f"{cases[case][1]}: {type(error).__name__}: {error}")
        progress.write(f"FAILED {failures[-1]}")

    def finish(case, future):
        try:
            future.result()
            progress.update(case)
        except Exception as error:  # report, go on, fail at the end
            fail(case, error)

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        read = lambda case: reader.submit(load, case, s, *inputs, *cases[case])  # noqa: E731
        loads = deque((case, read(case)) for case in todo[:PREFETCH])
        for position, case in enumerate(todo):
            if position + PREFETCH < len(todo):
                loads.append((todo[position + PREFETCH], read(todo[position + PREFETCH])))
            try:
                ct, affine, mask = loads.popleft()[1].result()
                if mask is None:
                    mask = inputs[1][
                        np.asanyarray(segment(nib.Nifti1Image(ct, affine)).dataobj).astype(np.uint8)
                    ]
                writes.append((case, writer.submit(save, case, ct, affine, mask, s)))
            except (Exception, SystemExit) as error:  # TotalSegmentator exits on some inputs: a failed case
                fail(case, error)
            while writes and (len(writes) > PREFETCH or writes[0][1].done()):
                finish(*writes.popleft())
        while writes:
            finish(*writes.popleft())
    return failures


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, type=Path, help="folder searched recursively for CTs")
    parser.add_argument("--dst", required=True, type=Path, help="output folder (ct/, mask/, qc/)")
    parser.add_argument("--region", required=True, choices=tuple(REGIONS))
    parser.add_argument("--from-totalseg", type=Path, help="existing TotalSegmentator multilabel outputs")
    parser.add_argument(
        "--metadata", nargs="+", help="CT-RATE metadata CSV(s) for the original (not _fixed) files"
    )
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching paths")
    parser.add_argument("--device", default="gpu", help="TotalSegmentator device: gpu, gpu:N, cpu, mps")
    parser.add_argument("--engine", default="predictor", choices=("predictor", "totalsegmentator"),
                        help="model loaded once (default), or TotalSegmentator's per-case call")  # fmt: skip
    parser.add_argument("--shard", default="0/1", help="I/N: process the cases whose id hashes to I mod N")
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="write PNG previews of N cases")
    return parser


def prepare(s):
    """The cases of this shard and what is needed to process them: (cases, mine, (metadata, lut,
    TotalSegmentator files)); removes a killed run's temporary files."""
    cases = find_cases(s.src, skip=(s.dst, s.from_totalseg), exclude=s.exclude)
    mine = sorted(c for c in cases if in_shard(c, s.shard))
    if not mine:
        raise BadInput(f"no CT found under {s.src} for shard {s.shard} (NIfTI, .npz or DICOM series folders)")
    prep.remove_temporaries(s.dst, lambda case: in_shard(case, s.shard))  # a killed run's, this shard's cases
    totalseg_files = {}
    for path in sorted(s.from_totalseg.rglob("*.nii*")) if s.from_totalseg else ():
        case = path.name.split(".nii")[0]
        if case in totalseg_files:
            raise BadInput(f"two TotalSegmentator maps for case {case}: {totalseg_files[case]} and {path}")
        totalseg_files[case] = path
    return cases, mine, (ct_io.load_metadata(s.metadata), prep.label_lut(s.region), totalseg_files)


def main(args):
    from tqdm import tqdm  # the progress bar: only when masks are made

    s = Settings(**{**vars(args), "metadata": tuple(args.metadata or ()), "exclude": tuple(args.exclude)})
    source = f"the maps in {s.from_totalseg}" if s.from_totalseg else f"{s.engine} on {s.device}"
    print(f"make_masks: {s.src} -> {s.dst}, region {s.region}, masks: {source}, shard {s.shard}")
    cases, mine, inputs = prepare(s)
    todo = [c for c in mine if not prep.is_done(s.dst, c, s.region)]
    print(f"{len(cases)} cases under {s.src}; shard {s.shard}: {len(mine)}, {len(mine) - len(todo)} done")
    with tqdm(total=len(todo), unit="case") as progress:
        failures = run_cases(todo, cases, s, inputs, SummaryEvery(progress, s.dst))
    mask_qc.write_summary(s.dst)
    for case in [c for c in mine if prep.is_done(s.dst, c, s.region)][: s.preview]:
        mask_qc.write_preview(s.dst, case, s.region)
    if failures:
        raise BadInput(f"{len(failures)} of {len(todo)} case(s) failed:\n  " + "\n  ".join(failures))
    print(f"done: {len(mine)} cases in {s.dst}; quality control in {s.dst / mask_qc.SUMMARY}")


class SummaryEvery:
    """The progress bar; rewrites masks_summary.csv (all shards' cases) at most once a minute."""

    def __init__(self, progress, dst, seconds=60):
        self.progress, self.dst, self.seconds, self.last, self.finished = (
            progress,
            dst,
            seconds,
            time.time(),
            [],
        )

    def update(self, case):
        self.progress.update()
        self.finished.append(case)
        if time.time() - self.last > self.seconds:  # merge the cases finished since: no rereading of all
            mask_qc.write_summary(self.dst, self.finished)
            self.last, self.finished = time.time(), []

    def write(self, line):
        self.progress.write(line)


def cli(argv=None):
    """The command line: unusable input, or cases that failed (listed), end in a message and exit status 1."""
    try:
        main(get_args_parser().parse_args(argv))
    except BadInput as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":  # TotalSegmentator's workers are spawned: keep the entry point guarded
    cli()
