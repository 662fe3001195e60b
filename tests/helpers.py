"""Shared by the tests: the scripts' command lines, the synthetic phantoms written and preprocessed, and where
the real example CT is."""

import os
from pathlib import Path

import numpy as np

import make_masks
import train
from ctkit import synthetic

TS_IDS = {1: 10, 2: 11, 3: 12, 4: 13, 5: 14, 6: 51}  # chest label -> TotalSegmentator 'total' id


def make_masks_cli(*args):
    """make_masks.py with these command-line arguments (paths may be Path objects)."""
    make_masks.cli([str(a) for a in args])


def train_cli(*args):
    """train.py with these command-line arguments, in this process (errors end as the script's one line)."""
    train.cli([str(a) for a in args])


def prepared_synthetic(root, train=4, val=2, test=2):
    """Phantoms written as a dataset (root/ct, root/totalseg, root/labels.csv) and run through make_masks.py
    with --from-totalseg into root/prep; returns root."""
    synthetic.write_synthetic(root, {"train": train, "val": val, "test": test})
    make_masks_cli(
        "--src",
        root / "ct",
        "--dst",
        root / "prep",
        "--region",
        "chest",
        "--from-totalseg",
        root / "totalseg",
    )
    return root


EXAMPLE = Path(os.environ["TOTALSEG_EXAMPLE"])  # found by conftest.py


def phantom(i, split="train"):
    """(ct, totalseg ids) as NIfTI-ordered (x, y, z) arrays of a small synthetic chest."""
    ct, mask, *_ = synthetic.make_phantom(np.random.default_rng([7, i, len(split)]), (24, 40, 40))
    ts = np.zeros_like(mask)
    for label, ts_id in TS_IDS.items():
        ts[mask == label] = ts_id
    return ct.transpose(2, 1, 0), ts.transpose(2, 1, 0)


def write_dicom_series(folder, volume, position, signed_12_bit):
    """One slice file per z of an (x, y, z) HU volume: axial, LPS, 1.5 mm pixels, 3 mm apart; file names out
    of order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 3.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.5, 1.5], 3.0
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated, ds.HighBit = (
            1,
            "MONOCHROME2",
            16,
            11,
        )
        pixels = volume[::-1, ::-1, k].T  # LPS rows/columns of a RAS (x, y, z) volume
        if signed_12_bit:  # RescaleIntercept 0 and negative values in 12-bit two's complement
            ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept = 12, 1, 0
            ds.PixelData = (pixels.astype(np.int32) & 0x0FFF).astype(np.uint16).tobytes()
        else:
            ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept = 16, 0, -1024
            ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.RescaleSlope = 1
        if signed_12_bit:
            ds.compress(RLELossless)  # RSNA re-encoded every series as RLE lossless
        ds.save_as(folder / f"{(k * 7) % volume.shape[2] + 1}.dcm", enforce_file_format=True)
