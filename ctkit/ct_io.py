"""Reading CTs as each dataset stores them, resampling onto one RAS grid, and writing NIfTI (paper §2.1).

Every reader returns (HU array indexed (i, j, k), 4x4 RAS affine). Used by make_masks.py (through prep.py for
the files it stores) and tools/predict.py.
  NIfTI   CT-RATE `*_fixed` files are HU with their geometry in the header; the originals have blank headers
          and raw stored values, rebuilt from the metadata CSV (`--metadata`).
  .npz    RAD-ChestCT: key 'ct', HU, 0.8 mm, axes superior->inferior, anterior->posterior, right->left.
  DICOM   a series folder (RATIC / RSNA 2023: <patient_id>/<series_id>/*.dcm), slices sorted along the normal.
"""

import ast
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ctkit import utils

SPACING = (1.5, 1.5, 3.0)  # x, y, z in mm
HU_RANGE = (-1000, 1000)  # paper §2.1
AIR_HU = -1024  # fill for CT outside the scanned volume; masks are filled with 0 (background)


def normalize(ct, window):
    """A tensor of HU clipped to the window and min-max scaled to [-1, 1] (paper A.2), on whatever device it
    is (the training device: the loaders only copy int16 windows)."""
    lo, hi = window
    return (ct.float().clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def read_nifti(path, metadata):
    """A NIfTI CT in HU; with `metadata` (CT-RATE originals) HU and geometry come from its VolumeName row."""
    img = nib.load(path)
    values = img.get_fdata(dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {values.shape}")
    row = metadata.get(os.path.basename(path)) if metadata else None
    if row is None:
        if metadata:
            raise ValueError("not in the --metadata CSV (VolumeName)")
        if values.min() >= 0:
            print(
                f"warning: {path}: no voxel below 0 - raw stored values? (CT-RATE originals need --metadata)"
            )
        return values, img.affine
    if values.min() < 0:  # originals store raw values, never negative; *_fixed files are HU
        raise ValueError(
            f"stored values go down to {values.min():.0f}, but original CT-RATE files are never negative: "
            "this is already HU (a *_fixed file, with its geometry in its header); give it without --metadata"
        )
    hu = values * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
    row_cos, col_cos = np.split(np.array(ast.literal_eval(row["ImageOrientationPatient"]), float), 2)
    spacing = [*ast.literal_eval(row["XYSpacing"]), float(row["ZSpacing"])]
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row_cos, col_cos, np.cross(row_cos, col_cos)], 1) * spacing
    affine[:3, 3] = ast.literal_eval(row["ImagePositionPatient"])
    return hu, np.diag([-1, -1, 1, 1]) @ affine  # DICOM LPS -> RAS


def load_metadata(paths):
    """{VolumeName: row} of CT-RATE metadata CSVs."""
    rows = {}
    for path in paths or []:
        try:
            rows.update({row["VolumeName"]: row for row in utils.read_csv(path, ["VolumeName"])})
        except FileNotFoundError as error:
            raise utils.BadInput(f"--metadata {error}") from None
    return rows


def npz_affine(spacing=0.8):
    """RAD-ChestCT's axes: superior->inferior, anterior->posterior, right->left, each against R, A or S. The
    files carry no origin: it is 0 here, and maps made for them are matched by orientation and shape only."""
    affine = np.zeros((4, 4))
    affine[2, 0] = affine[1, 1] = affine[0, 2] = -spacing
    affine[3, 3] = 1
    return affine


def read_npz(path):
    with np.load(path) as f:
        return f["ct"].astype(np.float32), npz_affine()


def read_dicom_series(folder):
    import pydicom  # only DICOM inputs need it (and its decoders)

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
    positions = np.array([ds.ImagePositionPatient for ds in slices], float)  # (n, 3) mm
    gaps = np.diff(positions, axis=0) @ normal
    # a tilted gantry shifts each slice within its plane: refused once the shift reaches half a pixel over the
    # series (the grid error it would cause), which the rounding of written positions never does
    along = (positions - positions[0]) @ normal
    drift = np.linalg.norm(positions - positions[0] - along[:, None] * normal, axis=1).max()
    if drift > 0.5 * min(float(v) for v in slices[0].PixelSpacing):
        angle = np.degrees(np.arctan2(drift, along[-1]))
        raise ValueError(
            f"a gantry-tilted series: the slices shift {drift:.3g} mm within their plane over "
            f"{along[-1]:.3g} mm (a tilt of {angle:.3g} degrees; a sheared volume, which TotalSegmentator's "
            "and this code's grids cannot hold); convert it with a tool that corrects the tilt (e.g. "
            "dcm2niix) and give the NIfTI"
        )
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
        slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
        hu[:, :, k] = pixels.T * slope + intercept
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


def read_case(kind, path, metadata=None):
    """(HU, affine) of a case of `kind` (nifti, npz or dicom); whatever the reader libraries raise on a file
    they cannot read (nibabel, gzip, zipfile, pydicom, a missing array) ends as one ValueError."""
    try:
        if kind == "nifti":
            return read_nifti(str(path), metadata)
        return read_npz(path) if kind == "npz" else read_dicom_series(path)
    except (OSError, ValueError):
        raise
    except Exception as error:  # each library its own exception types: one kind for the callers
        raise ValueError(
            f"cannot read it as {kind}: {type(error).__name__}: {' '.join(str(error).split())}"
        ) from None


# ----------------------------------------------------------------------------- grids


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
    if order == 0:  # a tie between two voxels: pick the same one in world space, whatever the storage order
        m[:3, 3] += np.linalg.solve(affine[:3, :3], np.full(3, 1e-3))
    linear = m[:3, :3]
    diagonal = np.count_nonzero(linear - np.diag(np.diag(linear))) == 0
    matrix = np.diag(linear) if diagonal else linear  # a diagonal matrix takes scipy's faster path
    return ndimage.affine_transform(
        volume, matrix, m[:3, 3], out_shape, output=volume.dtype, order=order, mode="grid-constant", cval=fill
    )


def same_voxels(shape_a, affine_a, shape_b, affine_b, tol=1e-3):
    """Whether two grids hold the same voxel centres, up to axis order and direction (e.g. LPS vs LAS)."""
    m = np.linalg.solve(affine_a, affine_b)  # voxel of b -> voxel of a
    axes = sorted(np.abs(np.round(m[:3, :3])).sum(0))
    if len(shape_a) != 3 or not np.allclose(m, np.round(m), atol=tol) or axes != [1, 1, 1]:
        return False
    corners = np.round(m) @ np.array([[0, 0, 0, 1], [*(n - 1 for n in shape_b), 1]]).T
    inside = corners.min() >= 0 and (corners[:3].max(1) <= np.array(shape_a) - 1).all()
    return sorted(shape_a) == sorted(shape_b) and inside


def reorient_like(array, affine, target_shape, target_affine):
    """`array` (with its `affine`) in the voxel order of the target grid, matched by axis orientation and
    shape only: for maps of header-less inputs (RAD-ChestCT .npz), whose origin and spacing are arbitrary."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(target_affine))
    reoriented = nib.orientations.apply_orientation(array, transform)
    if reoriented.shape != tuple(target_shape):
        codes = "".join(nib.aff2axcodes(affine))
        raise ValueError(
            f"shape {array.shape} ({codes}) does not match the CT's {tuple(target_shape)} "
            f"({''.join(nib.aff2axcodes(target_affine))}) in any orientation-preserving order"
        )
    return reoriented


def preprocess_ct(hu, affine):
    """HU volume -> (int16 CT resampled onto the RAS 1.5 x 1.5 x 3 mm grid, clipped to HU_RANGE, affine)."""
    if not np.isfinite(hu).all():
        raise ValueError(f"{np.count_nonzero(~np.isfinite(hu))} non-finite voxels")
    out_shape, out_affine = target_grid(hu.shape, affine)
    ct = np.clip(resample(hu, affine, out_shape, out_affine, 1, AIR_HU), *HU_RANGE)
    return np.rint(ct).astype(np.int16), out_affine


def save_nifti(array, affine, path, description=""):
    """Uncompressed NIfTI (what training memory-maps), written atomically; `description` in its header."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with utils.atomic_path(path) as tmp:  # a killed run leaves only a hidden .tmp.nii, removed on the rerun
        nib.save(img, tmp)
