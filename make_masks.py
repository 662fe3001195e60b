"""Preprocess CTs once and make their TotalSegmentator anatomy masks (paper §2.1).

    python make_masks.py --src ct/ --dst prep/ --region chest               # runs TotalSegmentator --fast
    python make_masks.py --src ct/ --dst prep/ --region chest --from-totalseg ts_seg/ts_total/
    python make_masks.py --src ct/ --dst prep/ --region abdomen --shard 3/8   # 8 GPUs / a SLURM array

Every case found under --src (recursively) is reoriented to RAS, resampled trilinearly onto a 1.5 x 1.5 x 3 mm
grid, clipped to [-1000, 1000] HU and stored as <dst>/ct/<case>.nii (int16, uncompressed, so that training
reads crops through a memory map). TotalSegmentator (task 'total', fast) then runs on that CT, and the
region's structures are merged into <dst>/mask/<case>.nii (uint8, same grid):
  chest:   1 lung_upper_lobe_left 2 lung_lower_lobe_left 3 lung_upper_lobe_right 4 lung_middle_lobe_right
           5 lung_lower_lobe_right 6 heart
  abdomen: 1 liver 2 spleen 3 kidney_left 4 kidney_right
           5 bowel (esophagus, stomach, duodenum, small_bowel, colon)
With --from-totalseg, existing TotalSegmentator multilabel files (same file name as the CT, on the CT's grid)
are resampled with nearest neighbour instead.

Inputs: NIfTI (CT-RATE: `*_fixed` files are HU; for the original files give --metadata), RAD-ChestCT .npz
(key 'ct', HU, 0.8 mm, axes superior->inferior, anterior->posterior, right->left), and DICOM series folders
(RATIC/Kaggle: <patient_id>/<series_id>/*.dcm, case id <patient_id>_<series_id>). Finished cases are skipped,
files are written atomically, and unreadable inputs are reported at the end (exit status 1).
"""

import argparse
import ast
import csv
import json
import os
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

import data
import utils

SPACING = (1.5, 1.5, 3.0)  # x, y, z in mm
HU_RANGE = (-1000, 1000)  # paper §2.1
MERGED = {"bowel": ("esophagus", "stomach", "duodenum", "small_bowel", "colon")}


def label_lut(region):
    """TotalSegmentator class id -> our label (0 elsewhere), from TotalSegmentator's own class map."""
    from totalsegmentator.map_to_binary import class_map

    ids = {name: i for i, name in class_map["total"].items()}
    lut = np.zeros(256, np.uint8)
    for label, structure in enumerate(data.REGIONS[region]["structures"], start=1):
        for name in MERGED.get(structure, (structure,)):
            lut[ids[name]] = label
    return lut


# ----------------------------------------------------------------------- readers: HU (i, j, k), RAS affine


def read_nifti(path, metadata):
    img = nib.load(path)
    hu = img.get_fdata(dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {hu.shape}")
    row = metadata.get(os.path.basename(path)) if metadata else None
    if row is None:
        if metadata:
            raise ValueError("not in the --metadata CSV (VolumeName)")
        if hu.min() >= 0:
            print(
                f"warning: {path}: no voxel below 0 - raw stored values? (CT-RATE originals need --metadata)"
            )
        return hu, img.affine
    # CT-RATE originals: blank header, stored values; rebuild HU and geometry from the DICOM tags
    hu = hu * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
    if hu.min() < -2000:  # the *_fixed files are HU already: rescaling them twice is a known pitfall
        raise ValueError(
            f"rescaling by the metadata gives {hu.min():.0f} HU: already HU (a *_fixed file)? "
            "drop --metadata for these"
        )
    row_cos, col_cos = np.split(np.array(ast.literal_eval(row["ImageOrientationPatient"]), float), 2)
    spacing = [*ast.literal_eval(row["XYSpacing"]), float(row["ZSpacing"])]
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row_cos, col_cos, np.cross(row_cos, col_cos)], 1) * spacing
    affine[:3, 3] = ast.literal_eval(row["ImagePositionPatient"])
    return hu, np.diag([-1, -1, 1, 1]) @ affine  # DICOM LPS -> RAS


def read_npz(path):
    with np.load(path) as f:
        hu = f["ct"].astype(np.float32)  # RAD-ChestCT: (superior->inferior, anterior->posterior, right->left)
    affine = np.zeros((4, 4))
    affine[2, 0] = affine[1, 1] = affine[0, 2] = -0.8  # each axis runs against R, A or S
    affine[3, 3] = 1
    return hu, affine


def read_dicom_series(folder):
    import pydicom

    slices = []
    for f in sorted(Path(folder).iterdir()):
        ds = pydicom.dcmread(f) if f.is_file() and is_dicom(f) else {}
        if "PixelData" in ds:
            slices.append(ds)
    if len({ds.SeriesInstanceUID for ds in slices}) != 1:
        raise ValueError(f"expected one DICOM series, found {len({ds.SeriesInstanceUID for ds in slices})}")
    row_cos, col_cos = np.split(np.array(slices[0].ImageOrientationPatient, float), 2)
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    positions = np.array([np.dot(ds.ImagePositionPatient, normal) for ds in slices])
    gaps = np.diff(positions)
    if len(slices) < 2 or gaps.min() <= 0 or gaps.max() - gaps.min() > 0.1 * np.median(gaps):
        low, high = (gaps.min(), gaps.max()) if len(gaps) else (0, 0)
        raise ValueError(
            f"{len(slices)} slices with uneven or duplicate positions (gaps {low:.3g}-{high:.3g} mm)"
        )
    hu = np.empty((slices[0].Columns, slices[0].Rows, len(slices)), np.float32)  # (column, row, slice)
    for k, ds in enumerate(slices):
        pixels = ds.pixel_array
        if ds.PixelRepresentation == 1 and ds.BitsStored < ds.BitsAllocated:
            # some encoders leave signed values unextended: shift the sign bit into place (no-op if right)
            shift = ds.BitsAllocated - ds.BitsStored
            pixels = (pixels.astype(np.int16 if ds.BitsAllocated == 16 else np.int32) << shift) >> shift
        hu[:, :, k] = pixels.T * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0)
        )
    dy, dx = (float(v) for v in slices[0].PixelSpacing)  # between rows, between columns
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row_cos * dx, col_cos * dy, normal * np.median(gaps)], 1)
    affine[:3, 3] = slices[0].ImagePositionPatient
    return hu, np.diag([-1, -1, 1, 1]) @ affine


def is_dicom(path):
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as f:  # names like CT.1.2.840... carry no usable suffix: look for the DICM marker
        return f.read(132)[128:] == b"DICM"


def find_cases(src, exclude=None):
    """{case id: (kind, path)}: every NIfTI, .npz and DICOM series folder under src (not under `exclude`)."""
    cases = {}
    for root, dirs, files in os.walk(src):
        root = Path(root)
        dirs[:] = [d for d in dirs if exclude is None or (root / d).resolve() != Path(exclude).resolve()]
        for name in files:
            if name.endswith((".nii", ".nii.gz")):
                case, kind, path = name.split(".nii")[0], "nifti", root / name
            elif name.endswith(".npz"):
                case, kind, path = name[:-4], "npz", root / name
            else:
                continue
            if case in cases:
                raise SystemExit(f"two inputs give case id {case}: {cases[case][1]} and {path}")
            cases[case] = (kind, path)
        if any(is_dicom(root / name) for name in files if not name.endswith((".nii", ".nii.gz", ".npz"))):
            cases[f"{root.parent.name}_{root.name}"] = ("dicom", root)
    return cases


def read_case(kind, path, metadata):
    if kind == "nifti":
        return read_nifti(str(path), metadata)
    return read_npz(path) if kind == "npz" else read_dicom_series(path)


# ----------------------------------------------------------------------------- resampling and storage


def target_grid(shape, affine, spacing=SPACING):
    """RAS-aligned grid of the given spacing covering the volume, its first voxel at the minimum corner."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:]
    lo, hi = world.min(1), world.max(1)
    out_shape = tuple(int(np.floor((b - a) / s + 1e-3)) + 1 for a, b, s in zip(lo, hi, spacing))
    out_affine = np.diag([*spacing, 1.0])
    out_affine[:3, 3] = lo
    return out_shape, out_affine


def resample(volume, affine, out_shape, out_affine, order, fill):
    """Sample `volume` (voxel -> world by `affine`) on the output grid: trilinear (order 1) or nearest (0)."""
    m = np.linalg.solve(affine, out_affine)  # output voxel -> input voxel
    m[np.abs(m) < 1e-9] = 0
    m[:3, 3] = np.where(np.abs(m[:3, 3] - np.round(m[:3, 3])) < 1e-6, np.round(m[:3, 3]), m[:3, 3])
    if (
        order == 0
    ):  # voxels equidistant from a sample point: pick the same one in world space, whatever the storage
        m[:3, 3] += np.linalg.solve(affine[:3, :3], np.full(3, 1e-3))
    matrix = (
        np.diag(m[:3, :3]) if np.count_nonzero(m[:3, :3] - np.diag(np.diag(m[:3, :3]))) == 0 else m[:3, :3]
    )
    return ndimage.affine_transform(
        volume, matrix, m[:3, 3], out_shape, output=volume.dtype, order=order, mode="grid-constant", cval=fill
    )


def same_voxels(shape_a, affine_a, shape_b, affine_b, tol=1e-3):
    """Whether two grids hold the same voxel centres, up to axis order and direction (e.g. LPS vs LAS)."""
    m = np.linalg.solve(affine_a, affine_b)  # voxel of b -> voxel of a
    if (
        len(shape_a) != 3
        or not np.allclose(m, np.round(m), atol=tol)
        or sorted(np.abs(np.round(m[:3, :3])).sum(0)) != [1, 1, 1]
    ):
        return False
    corners = np.round(m) @ np.array([[0, 0, 0, 1], [*(n - 1 for n in shape_b), 1]]).T
    return (
        sorted(shape_a) == sorted(shape_b)
        and corners.min() >= 0
        and (corners[:3].max(1) <= np.array(shape_a) - 1).all()
    )


def save_atomic(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with utils.atomic_path(path) as tmp:  # a killed run leaves only a hidden .tmp.nii, removed on the rerun
        nib.save(img, tmp)


def is_done(dst, case):
    """Both outputs exist, are complete and share one grid."""
    try:
        ct, mask = (
            data.nifti_layout(dst / "ct" / f"{case}.nii"),
            data.nifti_layout(dst / "mask" / f"{case}.nii"),
        )
    except (OSError, ValueError):
        return False
    return ct["shape"] == mask["shape"] and np.allclose(ct["affine"], mask["affine"], atol=1e-4)


def ensure_totalseg_config():
    """TotalSegmentator sends usage statistics unless its config.json says otherwise (no variable for it)."""
    from totalsegmentator.config import get_totalseg_dir

    home = get_totalseg_dir()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = (
        json.loads(path.read_text())
        if path.exists()
        else {"totalseg_id": "totalseg_anonymous", "prediction_counter": 0}
    )
    if config.get("send_usage_stats") is not False:
        config["send_usage_stats"] = False
        with utils.atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=4))


def preprocess_ct(hu, affine):
    """HU volume -> (int16 CT resampled onto the RAS 1.5 x 1.5 x 3 mm grid, clipped to HU_RANGE, affine)."""
    if not np.isfinite(hu).all():
        raise ValueError(f"{np.count_nonzero(~np.isfinite(hu))} non-finite voxels")
    out_shape, out_affine = target_grid(hu.shape, affine)
    ct = np.rint(np.clip(resample(hu, affine, out_shape, out_affine, 1, data.AIR_HU), *HU_RANGE)).astype(
        np.int16
    )
    return ct, out_affine


def process(case, kind, path, args, lut, totalseg_files):
    hu, affine = read_case(kind, path, args.metadata)
    ct, out_affine = preprocess_ct(hu, affine)
    out_shape = ct.shape
    if args.from_totalseg:
        if case not in totalseg_files:
            raise ValueError(f"no TotalSegmentator file named {case}.nii[.gz] under {args.from_totalseg}")
        seg_img = nib.load(totalseg_files[case])
        if not same_voxels(seg_img.shape, seg_img.affine, hu.shape, affine):
            raise ValueError(
                f"{totalseg_files[case]}: its grid {seg_img.shape} {np.round(seg_img.affine, 3).tolist()} "
                f"is not the CT's {hu.shape} {np.round(affine, 3).tolist()}"
            )
        labels = lut[np.asanyarray(seg_img.dataobj).astype(np.uint8)]
        mask = resample(labels, seg_img.affine, out_shape, out_affine, 0, 0)
    else:
        from totalsegmentator.python_api import totalsegmentator

        seg_img = totalsegmentator(
            nib.Nifti1Image(ct, out_affine),
            None,
            task="total",
            fast=True,
            ml=True,
            device=args.device,
            quiet=True,
        )
        mask = lut[np.asanyarray(seg_img.dataobj).astype(np.uint8)]
    for name, array in (("ct", ct), ("mask", mask)):  # the mask last: its presence marks the case as done
        save_atomic(array, out_affine, args.dst / name / f"{case}.nii")


def load_metadata(paths):
    rows = {}
    for path in paths or []:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows[row["VolumeName"]] = row
    return rows


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, type=Path, help="folder searched recursively for CTs")
    parser.add_argument("--dst", required=True, type=Path, help="output folder (ct/ and mask/)")
    parser.add_argument("--region", required=True, choices=tuple(data.REGIONS))
    parser.add_argument("--from-totalseg", type=Path, help="existing TotalSegmentator multilabel outputs")
    parser.add_argument(
        "--metadata", nargs="+", help="CT-RATE metadata CSV(s) for the original (not _fixed) files"
    )
    parser.add_argument("--device", default="gpu", help="TotalSegmentator device: gpu, gpu:N, cpu, mps")
    parser.add_argument("--shard", default="0/1", help="I/N: process the cases whose id hashes to I mod N")
    return parser


def in_shard(case, shard):
    """`shard` "I/N": a stable hash of the case id decides, so shards never overlap whatever they list."""
    index, count = (int(v) for v in shard.split("/"))
    return zlib.crc32(case.encode()) % count == index


def main(args):
    from tqdm import tqdm

    cases = find_cases(args.src, exclude=args.dst)
    mine = sorted(c for c in cases if in_shard(c, args.shard))
    if not mine:
        sys.exit(f"no CT found under {args.src} for shard {args.shard} (NIfTI, .npz or DICOM series folders)")
    for sub in ("ct", "mask"):
        (args.dst / sub).mkdir(parents=True, exist_ok=True)
        for name in os.listdir(args.dst / sub):  # temporary files of a killed run (cases of this shard only)
            if (
                name.startswith(".")
                and name.endswith(".tmp.nii")
                and in_shard(name[1 : -len(".tmp.nii")], args.shard)
            ):
                (args.dst / sub / name).unlink()
    args.metadata = load_metadata(args.metadata)
    totalseg_files = {}
    if args.from_totalseg:
        totalseg_files = {p.name.split(".nii")[0]: p for p in args.from_totalseg.rglob("*.nii*")}
    else:
        ensure_totalseg_config()
    lut = label_lut(args.region)
    todo = [c for c in mine if not is_done(args.dst, c)]
    done = len(mine) - len(todo)
    print(f"{len(cases)} cases under {args.src}; shard {args.shard}: {len(mine)}, {done} already done")
    failures = []
    for case in tqdm(todo, unit="case"):
        kind, path = cases[case]
        try:
            process(case, kind, path, args, lut, totalseg_files)
        except Exception as error:  # report, go on, fail at the end
            failures.append(f"{path}: {type(error).__name__}: {error}")
            tqdm.write(f"FAILED {failures[-1]}")
    if failures:
        sys.exit(f"{len(failures)} of {len(todo)} case(s) failed:\n  " + "\n  ".join(failures))
    print(f"done: {len(mine)} cases in {args.dst}")


if __name__ == "__main__":  # TotalSegmentator's workers are spawned: keep the entry point guarded
    main(get_args_parser().parse_args())
