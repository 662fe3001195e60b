"""The prepared folder: what make_masks.py writes, defined where it is written, and checked before training.

    <prep>/ct/<case>.nii     int16 HU on the RAS 1.5 x 1.5 x 3 mm grid (uncompressed: training memory-maps it)
    <prep>/qc/<case>.json    the case's quality-control record (mask_qc.case_row)
    <prep>/mask/<case>.nii   uint8 labels of the region (regions.REGIONS), same grid, MASK_STAMP in its header
    <prep>/masks_summary.csv the QC records of all cases (mask_qc.write_summary)

`write_case` writes a case in that order, each file atomically: a mask, with its region's stamp, marks a case
as done (`is_done`). Training reads the files through `nifti_layout` and refuses what it could not read as
written here (`check_layouts`, `check_prep_dir`).
"""

import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctkit import ct_io, utils
from ctkit.regions import MERGED, REGIONS
from ctkit.utils import BadInput

CT, MASK, QC = "ct", "mask", "qc"  # the sub-folders


def case_path(prep_dir, sub, case):
    return os.path.join(prep_dir, sub, f"{case}.nii" if sub != QC else f"{case}.json")


def mask_stamp(region):
    """Written into every mask's NIfTI description and checked for every case at training: the region and a
    checksum of its label scheme (masks of the other region share labels 1-5)."""
    scheme = ",".join(REGIONS[region]["structures"])
    return f"make_masks region={region} labels={zlib.crc32(scheme.encode()):08x}"


def label_lut(region):
    """TotalSegmentator class id -> the region's label (0 elsewhere), from TotalSegmentator's class map."""
    # a heavy optional dependency: imported only where masks are made
    from totalsegmentator.map_to_binary import class_map

    ids = {name: i for i, name in class_map["total"].items()}
    lut = np.zeros(256, np.uint8)
    for label, structure in enumerate(REGIONS[region]["structures"], start=1):
        for name in MERGED.get(structure, (structure,)):
            lut[ids[name]] = label
    return lut


def write_case(prep_dir, case, ct, affine, mask, region, qc_record):
    """The CT, its QC record, then the mask (written last, with the region's stamp: the case is done)."""
    ct_io.save_nifti(ct, affine, case_path(prep_dir, CT, case))
    with utils.atomic_path(case_path(prep_dir, QC, case)) as tmp:
        Path(tmp).write_text(json.dumps(qc_record))
    ct_io.save_nifti(mask, affine, case_path(prep_dir, MASK, case), mask_stamp(region))


def is_done(prep_dir, case, region):
    """CT, QC record and mask exist, are complete, share one grid and the mask has this region's stamp. A mask
    stamped for the other region is refused: one prep folder holds one region."""
    stamp = mask_stamp(region)
    try:
        ct, mask = (nifti_layout(case_path(prep_dir, sub, case)) for sub in (CT, MASK))
    except (OSError, ValueError):
        return False
    if mask["description"] not in (stamp, "") and mask["description"].startswith("make_masks region="):
        raise BadInput(f"{case_path(prep_dir, MASK, case)} is {mask['description']!r}, this run {stamp!r}: "
                       "one --dst holds the masks of one region; use another --dst")  # fmt: skip
    same_grid = ct["shape"] == mask["shape"] and np.allclose(ct["affine"], mask["affine"], atol=1e-4)
    return same_grid and mask["description"] == stamp and os.path.exists(case_path(prep_dir, QC, case))


def remove_temporaries(prep_dir, mine):
    """Delete the hidden temporary files a killed run left, of the cases for which mine(case) is true."""
    for sub in (CT, MASK, QC):
        os.makedirs(os.path.join(prep_dir, sub), exist_ok=True)
        for name in os.listdir(os.path.join(prep_dir, sub)):
            if name.startswith(".") and ".tmp" in name and mine(name[1:].rsplit(".tmp", 1)[0]):
                os.unlink(os.path.join(prep_dir, sub, name))


def is_prep(folder):
    """A prepared folder (ct/ and mask/ beside each other): never an input of make_masks.py."""
    return os.path.isdir(os.path.join(folder, CT)) and os.path.isdir(os.path.join(folder, MASK))


# ----------------------------------------------------------------------------- reading what was written


def nifti_layout(path):
    """Where the voxels of an uncompressed NIfTI written here lie: {shape (D, H, W), dtype, offset, affine,
    description}. Raises BadInput for anything a memory map could not read correctly (compressed, scaled,
    torn)."""
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
    description = header["descrip"].item().decode(errors="replace").strip("\x00 ")
    return {"shape": shape[::-1], "dtype": dtype, "offset": offset, "affine": header.get_best_affine(),
            "description": description}  # fmt: skip


def check_layouts(paths, layouts, stamp=None):
    """A case's stored CT (and mask): the data types written here, one grid, the mask made for this region."""
    for path, layout, dtype in zip(paths, layouts, (np.int16, np.uint8)):
        if layout["dtype"] != dtype:
            raise BadInput(f"{path}: data type {layout['dtype']}, expected {np.dtype(dtype)} (make_masks.py)")
    if len(paths) < 2:
        return
    (ct_path, mask_path), (ct, mask) = paths, layouts
    if ct["shape"] != mask["shape"] or not np.allclose(ct["affine"], mask["affine"], atol=1e-3):
        raise BadInput(f"{mask_path}: grid {mask['shape']} does not match its CT {ct_path} {ct['shape']} "
                       "(shape or affine)")  # fmt: skip
    if stamp is not None and mask["description"] != stamp:
        found = mask["description"] or "no region stamp (made by an older make_masks.py?)"
        raise BadInput(f"{mask_path}: {found!r}, this run needs {stamp!r}: rerun make_masks.py with the "
                       "right --region for these cases (a rerun redoes masks of another scheme)")  # fmt: skip


def check_prep_dir(prep_dir, data_path):
    """Fail before anything is read or written if the prepared folder is not where the run looks, naming the
    folder searched and any prepared folder found below --data-path (e.g. one level too high)."""
    if os.path.isdir(os.path.join(prep_dir, CT)):
        return
    found = []
    for root, dirs, _ in os.walk(data_path or "."):
        depth = os.path.relpath(root, data_path or ".").count(os.sep)
        if {CT, MASK} <= set(dirs) and os.path.abspath(root) != os.path.abspath(prep_dir):
            found.append(root)
        dirs[:] = [] if depth >= 3 or len(found) >= 3 else [d for d in sorted(dirs) if d not in (CT, MASK)]
    hint = (
        "; found prepared folder(s) " + ", ".join(found) + " (--prep-dir, or a --data-path one level down?)"
    )
    raise BadInput(f"no preprocessed volumes: {os.path.join(prep_dir, CT)} does not exist "
                   f"({hint[2:] if found else 'run make_masks.py first, or pass --prep-dir'})")  # fmt: skip
