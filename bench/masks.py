"""Per-case wall time of make_masks.py with both TotalSegmentator engines, measured in one run.

    python bench/masks.py                  # 3 cases per engine, the offline stand-in model (tiny network)
    python bench/masks.py --cases 5 --real # your TotalSegmentator weights (TOTALSEG_HOME_DIR), --device gpu

The CT is realistic in size: the example abdomen CT resampled to 488 x 404 x 224 voxels of 0.75 x 0.75 x
1.5 mm (random noise of that size if the example is not there; --shape: fewer voxels of the same size, the
example squeezed into them, for a quick rehearsal), stored as .nii.gz like a dataset. Both engines
run the whole make_masks.py path on the same copies of it: `--engine totalsegmentator` (TotalSegmentator's
own call per case) and `--engine predictor` (one predictor per process, reads and writes in threads). The
predictor's one-time set-up is timed separately, and one case's stages are timed on their own.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import make_masks  # noqa: E402
from ctkit import ct_io, precision, totalseg  # noqa: E402

SHAPE, ZOOMS = (488, 404, 224), (0.75, 0.75, 1.5)
EXAMPLE = ROOT.parent / "shared" / "data" / "totalsegmentator_example" / "example_ct.nii.gz"


def write_ct(path, shape=SHAPE):
    """A CT of `shape` voxels of ZOOMS mm (RAS), from the example CT if it is there."""
    if EXAMPLE.exists():
        source = nib.load(EXAMPLE)
        volume = ndimage.zoom(
            source.get_fdata(dtype=np.float32), [n / m for n, m in zip(shape, source.shape)], order=1
        )
        affine = source.affine @ np.diag([*(m / n for n, m in zip(SHAPE, source.shape)), 1])  # as at SHAPE
    else:
        volume = np.random.default_rng(0).normal(-300, 300, shape).astype(np.float32)
        affine = np.diag([*ZOOMS, 1.0])
    nib.save(nib.Nifti1Image(np.rint(volume).astype(np.int16), affine), path)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_engine(engine, src, dst, device):
    """Seconds for make_masks.py over every case in src with this engine."""
    args = make_masks.get_args_parser().parse_args(
        ["--src", str(src), "--dst", str(dst), "--region", "abdomen", "--device", device, "--engine", engine]
    )
    seconds, _ = timed(make_masks.main, args)
    return seconds


def stages(src, device):
    """One case's stages on their own: read, resample, network (predictor built beforehand), write."""
    path = next(src.glob("*.nii.gz"))
    t_init, engine = timed(totalseg.FastTotal, device)
    t_read, (hu, affine) = timed(ct_io.read_case, "nifti", path)
    t_resample, (ct, out_affine) = timed(ct_io.preprocess_ct, hu, affine)
    t_network, labels = timed(engine, nib.Nifti1Image(ct, out_affine))
    with tempfile.TemporaryDirectory() as folder:
        t_write, _ = timed(ct_io.save_nifti, ct, out_affine, os.path.join(folder, "ct.nii"))
    return {
        "predictor set-up (once per process)": t_init,
        "read .nii.gz": t_read,
        "resample to 1.5 x 1.5 x 3 mm": t_resample,
        "network (TotalSegmentator pipeline)": t_network,
        "write the CT": t_write,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="use the installed TotalSegmentator weights")
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("X", "Y", "Z"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if not args.real:
            from totalseg_standin import make_standin

            make_standin(folder / "home")
            os.environ["TOTALSEG_HOME_DIR"] = str(folder / "home")
            os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
        (folder / "src").mkdir()
        write_ct(folder / "src" / "case0.nii.gz", args.shape)
        for i in range(1, args.cases):
            os.link(folder / "src" / "case0.nii.gz", folder / "src" / f"case{i}.nii.gz")
        source = "installed weights" if args.real else "stand-in model"
        cpu = f"{os.cpu_count()} CPU cores: {precision.device_name()}"
        print(f"{args.cases} cases of {tuple(args.shape)} voxels, {ZOOMS} mm, {cpu}, {args.device}")
        print(f"TotalSegmentator 'total' fast: {source}")
        for name, seconds in stages(folder / "src", args.device).items():
            print(f"  {name:<40} {seconds:6.2f} s")
        totals = {
            engine: run_engine(engine, folder / "src", folder / engine, args.device)
            for engine in ("totalsegmentator", "predictor")
        }
    for engine, seconds in totals.items():
        print(
            f"make_masks.py --engine {engine:<17} {seconds / args.cases:6.2f} s per case "
            f"({seconds:.1f} s for {args.cases}, set-up included)"
        )
    print(f"per-case speed-up: {totals['totalsegmentator'] / totals['predictor']:.1f}x")


if __name__ == "__main__":  # TotalSegmentator's workers are spawned: keep the entry point guarded
    main()
