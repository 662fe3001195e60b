"""Classify one new CT with a trained run (the deployed model: no segmentation head is evaluated).

    python tools/predict.py scan.nii.gz --checkpoint runs/ctrate_r3d_seg_s0/checkpoint_best.pth
    python tools/predict.py trn00001.npz --checkpoint ...        # RAD-ChestCT volume
    python tools/predict.py dicom_series_folder/ --checkpoint ...

The CT is read and preprocessed exactly as make_masks.py does (RAS, 1.5 x 1.5 x 3 mm, HU clip), centre-cropped
as in evaluation, and each class probability is compared with the run's threshold: chosen on its validation
split if it had one (metrics_val.json), else on its test split (metrics_test.json). For RATIC those thresholds
were chosen per patient (the mean of a patient's series); average the series of one patient the same way.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # a script of this folder stands on the top level
import data  # noqa: E402
from ctkit import ct_io, utils  # noqa: E402
from ctkit.labels import ABBREVIATIONS  # noqa: E402
from model import build_model, probabilities  # noqa: E402


def load_model(checkpoint_path):
    """(model in eval mode, its data.Task, the training args) of a checkpoint, loaded weights_only=True."""
    state = utils.load_checkpoint(checkpoint_path)
    task, args = data.Task.from_dict(state["task"]), state["args"]
    model = build_model(args["model"], task, args["seg"])
    model.load_state_dict(state["model"])
    return model.eval(), task, args


def run_thresholds(folder):
    """{class: threshold} of the run (validation metrics preferred) and the file they come from."""
    for name in ("metrics_val.json", "metrics_test.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return {r["class"]: r["threshold"] for r in utils.read_json(path)["classes"]}, path
    return {}, None


def predict(ct_path, checkpoint_path):
    """Print and return {class: probability} for one CT."""
    model, task, args = load_model(checkpoint_path)
    kind = "dicom" if os.path.isdir(ct_path) else "npz" if ct_path.endswith(".npz") else "nifti"
    ct, _ = ct_io.preprocess_ct(*ct_io.read_case(kind, ct_path))
    ct = ct.transpose(2, 1, 0)  # NIfTI (x, y, z) -> (D, H, W)
    crop = data.read_window(ct, data.window_start(ct.shape, task.pad, task.crop), task.crop, data.AIR_HU)
    with torch.no_grad():
        logits = model(data.normalize(torch.from_numpy(crop)[None, None], task.window))
    probs = probabilities(logits, task)[0].tolist()
    thresholds, source = run_thresholds(os.path.dirname(checkpoint_path))
    print(
        f"{ct_path}: {args['model']} {'w/' if args['seg'] else 'w/o'} seg, thresholds from {source or 'none'}"
    )
    for name, p in zip(task.classes, probs):
        t = thresholds.get(name)
        verdict = "" if t is None else f"threshold {t:.3f}  " + ("POSITIVE" if p >= t else "negative")
        print(f"  {ABBREVIATIONS.get(name, ''):>7} {name:<36} p = {p:.3f}  {verdict}")
    return dict(zip(task.classes, probs))


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ct", help="a NIfTI file, a RAD-ChestCT .npz or a DICOM series folder")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth / checkpoint_best.pth of a run")
    return parser


def cli(argv=None):
    """The command line: a CT or checkpoint that cannot be used ends in one line and exit status 1."""
    args = get_args_parser().parse_args(argv)
    try:
        predict(args.ct, args.checkpoint)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot classify {args.ct}: {error}") from None


if __name__ == "__main__":
    cli()
