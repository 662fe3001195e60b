"""The prepared folder: what make_masks.py writes, defined where it is written, and checked before training.

    <prep>/labels.json       the label scheme of the masks: {"scheme": name, "labels": {id: class name}}
    <prep>/ct/<case>.nii     int16 HU on the RAS 1.5 x 1.5 x 3 mm grid (uncompressed: training memory-maps it)
    <prep>/qc/<case>.json    the case's quality-control record (mask_qc.case_row)
    <prep>/mask/<case>.nii   uint8: what the segmenter said (TotalSegmentator's whole 'total' map, or another
                             segmenter's labels), same grid, the scheme's stamp in its NIfTI description
    <prep>/masks_summary.csv the QC records of all cases (mask_qc.write_summary)

The run chooses which labels it learns when it reads them (ctkit/structures.py), so changing the structure set
needs no new mask run. `write_case` writes a case in the order above, each file atomically: a mask with the
scheme's stamp marks a case as done (`is_done`). Training reads the files through `nifti_layout` and refuses
what it could not read as written here (`read_scheme`, `check_layouts`, `check_prep_dir`).
"""

import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctkit import ct_io, utils
from ctkit.utils import BadInput

CT, MASK, QC = "ct", "mask", "qc"  # the sub-folders
SCHEME = "labels.json"
TOTALSEG = "totalseg_total"  # TotalSegmentator's 'total' task: its class_map["total"]


def case_path(prep_dir, sub, case):
    return os.path.join(prep_dir, sub, f"{case}.nii" if sub != QC else f"{case}.json")


def case_id(path):
    """The case id of an input (make_masks.py's file names, and labels CSVs' `path` column): a NIfTI file's
    name without .nii[.gz], a .npz file's stem, a DICOM series folder's '<parent>_<folder>'."""
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        return path.name.split(".nii")[0]
    if path.suffix == ".npz":
        return path.stem
    return f"{path.parent.name}_{path.name}"


def totalseg_scheme():
    """(TOTALSEG, {id: name}) from TotalSegmentator's own class map."""
    # a heavy optional dependency: imported only where its scheme is needed
    from totalsegmentator.map_to_binary import class_map

    return TOTALSEG, {int(i): name for i, name in class_map["total"].items()}


def mask_stamp(name, table):
    """Written into every mask's NIfTI description and checked for every case at training: the scheme's name
    and a checksum of its id -> name table."""
    text = name + ";" + ",".join(f"{i}:{table[i]}" for i in sorted(table, key=int))
    return f"make_masks scheme={name[:24]} labels={zlib.crc32(text.encode()):08x}"  # <= 79 bytes (NIfTI)


def read_label_map(path):
    """{id: name} of a label-map JSON ({"1": "liver", ...} or {"labels": {...}}): ids 1..254, names unique."""
    try:
        pairs = json.loads(Path(path).read_text(), object_pairs_hook=list)  # a key given twice stays visible
        raw = dict(pairs).get("labels", pairs)
        table, key_of = {}, {}
        for key, name in raw:
            if key_of.setdefault(int(key), key) != key or int(key) in table:  # "1" twice, or "1" and "01"
                raise BadInput(f"{path}: keys {key_of[int(key)]!r} and {key!r} are both label {int(key)}")
            table[int(key)] = str(name)
    except BadInput:
        raise
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise BadInput(f"{path}: not a label map {{id: name}} ({error})") from None
    if not table or not all(0 < i < 255 for i in table) or len(set(table.values())) < len(table):
        raise BadInput(f"{path}: label ids must be 1..254 (0 is background) and each name must appear once")
    return table


def write_scheme(prep_dir, name, table):
    """<prep>/labels.json, or check that the one there is this scheme: one prepared folder, one scheme (a
    labels.json without masks, left by a run that failed, is replaced)."""
    path, masks = os.path.join(prep_dir, SCHEME), os.path.join(prep_dir, MASK)
    holds_masks = os.path.isdir(masks) and bool(os.listdir(masks))  # a scheme left without masks is replaced
    if os.path.exists(path) and holds_masks:
        found_name, found, stamp = read_scheme(prep_dir)
        if stamp != mask_stamp(name, table):
            differ = [i for i in sorted(set(found) | set(table)) if found.get(i) != table.get(i)][:3]
            shown = "; ".join(f"id {i}: {found.get(i)} there, {table.get(i)} here" for i in differ)
            raise BadInput(
                f"{path}: this folder holds masks of scheme {found_name!r}, this run makes {name!r}"
                f"{' with other labels (' + shown + ')' if found_name == name else ''}; use another --dst"
            )
        return
    os.makedirs(prep_dir, exist_ok=True)
    utils.write_json(path, {"scheme": name, "labels": {str(i): table[i] for i in sorted(table)}})


def read_scheme(prep_dir):
    """(name, {id: name}, stamp) of a prepared folder's masks."""
    path = os.path.join(prep_dir, SCHEME)
    if not os.path.exists(path):
        raise BadInput(
            f"{path} is missing: {prep_dir} is not a folder of this make_masks.py; rerun it "
            "into a new --dst (with --from-totalseg if you kept TotalSegmentator's outputs)"
        )
    saved = utils.read_json(path)
    table = {int(i): n for i, n in saved["labels"].items()}
    return saved["scheme"], table, mask_stamp(saved["scheme"], table)


def write_case(prep_dir, case, ct, affine, mask, stamp, qc_record):
    """The CT, its QC record, then the mask (written last, with the scheme's stamp: the case is done)."""
    ct_io.save_nifti(ct, affine, case_path(prep_dir, CT, case))
    with utils.atomic_path(case_path(prep_dir, QC, case)) as tmp:
        Path(tmp).write_text(json.dumps(qc_record))
    ct_io.save_nifti(mask, affine, case_path(prep_dir, MASK, case), stamp)


def is_done(prep_dir, case, stamp):
    """CT, QC record and mask exist, are complete, share one grid and the mask has this scheme's stamp."""
    try:
        ct, mask = (nifti_layout(case_path(prep_dir, sub, case)) for sub in (CT, MASK))
    except (OSError, ValueError):
        return False
    same_grid = ct["shape"] == mask["shape"] and np.allclose(ct["affine"], mask["affine"], atol=1e-4)
    return same_grid and mask["description"] == stamp and os.path.exists(case_path(prep_dir, QC, case))


def remove_temporaries(prep_dir, mine):
    """Delete the hidden temporary files a killed run left, of the cases for which mine(case) is true."""
    for sub in (CT, MASK, QC):
        os.makedirs(os.path.join(prep_dir, sub), exist_ok=True)
        utils.remove_temporaries(os.path.join(prep_dir, sub), mine)


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
    return {
        "shape": shape[::-1],
        "dtype": dtype,
        "offset": offset,
        "affine": header.get_best_affine(),
        "description": description,
    }


def check_layouts(paths, layouts, stamp=None):
    """A case's stored CT (and mask): the data types written here, one grid, a mask of the folder's scheme."""
    for path, layout, dtype in zip(paths, layouts, (np.int16, np.uint8)):
        if layout["dtype"] != dtype:
            raise BadInput(f"{path}: data type {layout['dtype']}, expected {np.dtype(dtype)} (make_masks.py)")
    if len(paths) < 2:
        return
    (ct_path, mask_path), (ct, mask) = paths, layouts
    if ct["shape"] != mask["shape"] or not np.allclose(ct["affine"], mask["affine"], atol=1e-3):
        raise BadInput(
            f"{mask_path}: grid {mask['shape']} does not match its CT {ct_path} {ct['shape']} "
            "(shape or affine)"
        )
    if stamp is not None and mask["description"] != stamp:
        found = mask["description"] or "no scheme stamp"
        raise BadInput(
            f"{mask_path}: {found!r}, but the folder's {SCHEME} says {stamp!r}: a mask of "
            "another scheme (copied from another folder?); rerun make_masks.py on it"
        )


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
    raise BadInput(
        f"no preprocessed volumes: {os.path.join(prep_dir, CT)} does not exist "
        f"({hint[2:] if found else 'run make_masks.py first, or pass --prep-dir'})"
    )
