"""The README's evidence sheet: a seg-trained run of the positive control (docs/synthetic_study_fissures.md)
explains the first test phantom positive for a nodule class that the run also calls positive (at its
validation threshold), through tools/predict.py --explain, as a user would run it on a new CT.

    python docs/study/fissures/evidence_sheet.py runs/fissures64/seg_s0 docs/evidence_example.png

The case is chosen by that rule only (not by how the sheet looks). The phantom is rebuilt from its index
(each is a pure function of its split and index) and written as NIfTI, so predict.py reads and crops it as it
would any CT.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import predict  # noqa: E402
from ctkit import synthetic, utils  # noqa: E402
from ctkit.labels import read_predictions  # noqa: E402


def first_true_positive(run, finding):
    """Index of the first test case positive for `finding` whose probability reaches the run's threshold."""
    scores = read_predictions(str(run / "predictions_test.csv"))
    thresholds, source = predict.run_thresholds(str(run))
    k = scores["classes"].index(finding)
    hits = np.flatnonzero((scores["y_true"][:, k] == 1) & (scores["y_prob"][:, k] >= thresholds[finding]))
    if not len(hits):
        raise SystemExit(f"{run}: no test case positive for {finding} reaches its threshold ({source})")
    case = scores["cases"][hits[0]]
    return int(case.rsplit("_", 1)[1]), case


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run", type=Path, help="a seg-trained run folder of the study")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--finding", default="nodule_right_upper_lobe")
    args = parser.parse_args()
    config = utils.read_json(args.run / "config.json")
    index, case = first_true_positive(args.run, args.finding)
    n = index + 1  # the split's phantoms in order, up to this one
    *_, (ct, _, _, _) = synthetic.phantoms(
        "test", n, pad=config["task"]["pad"], variant=config["synthetic_variant"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        scan = Path(tmp) / f"{case}.nii.gz"  # (D, H, W) -> NIfTI's (x, y, z), as write_synthetic stores it
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), np.diag([1.5, 1.5, 3.0, 1])), scan
        )
        predict.predict(str(scan), str(args.run / "checkpoint_best.pth"), explain=tmp)
        sheet = next(Path(tmp).glob(f"evidence_*_{args.finding}.png"))
        with utils.atomic_path(str(args.out)) as part:
            Path(part).write_bytes(sheet.read_bytes())
    print(f"wrote {args.out}: {args.finding} of {case}")


if __name__ == "__main__":
    main()
