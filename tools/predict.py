"""Classify one new CT with a trained run (the deployed model: no segmentation head is evaluated).

    python tools/predict.py scan.nii.gz --checkpoint runs/ctrate_r3d_seg_s0/checkpoint_best.pth
    python tools/predict.py trn00001.npz --checkpoint ...        # RAD-ChestCT volume
    python tools/predict.py dicom_series_folder/ --checkpoint ...
    python tools/predict.py scan.nii.gz --checkpoint ... --explain out/ --features out/features.npz

The CT is read and preprocessed exactly as make_masks.py does (RAS, 1.5 x 1.5 x 3 mm, HU clip), centre-cropped
as in evaluation, and each class probability is compared with the run's threshold: chosen on its validation
split if it had one (metrics_val.json), else on its test split (metrics_test.json). For RATIC those thresholds
were chosen per patient (the mean of a patient's series); average the series of one patient the same way.

--explain DIR draws, per model output, its evidence map: eq. 1's linear head applied at every voxel of the
last feature map (ctkit/evidence.py; its mean plus the bias is the logit, exactly), upsampled trilinearly to
the crop, over the CT in three orthogonal planes through the strongest evidence inside the body (red raises
the logit, blue lowers it), and for a seg-trained model the seg head's anatomy in the same planes.
--features FILE.npz saves the pooled feature vector (eq. 1's input to the linear head), the logits and the
probabilities.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

# a script of this folder stands on the top level
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as M  # noqa: E402
from ctkit import ct_io, evidence, inference, learning_report, utils  # noqa: E402
from ctkit.labels import ABBREVIATIONS  # noqa: E402

BODY_HU = -500  # soft tissue and bone lie above, air (outside and in the lungs) below


def load_model(checkpoint_path):
    """(model in eval mode, its data.Task, the training args) of a checkpoint, loaded weights_only=True."""
    state = utils.load_checkpoint(checkpoint_path)
    task, args = data.Task.from_dict(state["task"]), state["args"]
    model = M.build_model(args["model"], task, args["seg"])
    model.load_state_dict(state["model"])
    return model.eval(), task, args


def run_thresholds(folder):
    """{class: threshold} of the run (validation metrics preferred) and the file they come from."""
    for name in ("metrics_val.json", "metrics_test.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return {r["class"]: r["threshold"] for r in utils.read_json(path)["classes"]}, path
    return {}, None


def output_names(task):
    """What each model output is (what an evidence map explains): the classes, or RATIC's 11 head outputs."""
    if task.kind != "ratic":
        return list(task.classes)
    binary = [f"{name}_injury" for name in M.RATIC_BINARY]
    return binary + [f"{organ}_{grade}" for organ in M.RATIC_ORGANS for grade in M.RATIC_GRADES]


def read_crop(ct_path, task):
    """The CT as make_masks.py preprocesses it, centre-cropped as in evaluation: int16 HU (D, H, W)."""
    kind = "dicom" if os.path.isdir(ct_path) else "npz" if ct_path.endswith(".npz") else "nifti"
    ct, _ = ct_io.preprocess_ct(*ct_io.read_case(kind, ct_path))
    ct = ct.transpose(2, 1, 0)  # NIfTI (x, y, z) -> (D, H, W)
    return data.read_window(ct, data.window_start(ct.shape, task.pad, task.crop), task.crop, data.AIR_HU)


def write_features(path, model, x, logits, probs, task):
    """FILE.npz: features (C,) pooled from the last feature map, logits (outputs,), probabilities (classes,)
    and the names of both (np.load(path)["features"])."""
    with torch.no_grad():
        features = model.backbone(x).mean(dim=(2, 3, 4))[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            features=features.numpy(),
            logits=logits[0].numpy(),
            probabilities=np.array(probs),
            outputs=np.array(output_names(task)),
            classes=np.array(task.classes),
        )


def predict(ct_path, checkpoint_path, explain=None, features=None):
    """Print and return {class: probability} for one CT; with explain / features also write those."""
    model, task, args = load_model(checkpoint_path)
    crop = read_crop(ct_path, task)
    x = ct_io.normalize(torch.from_numpy(crop)[None, None], task.window)  # (1, 1, D, H, W)
    with torch.no_grad():
        logits = model(x)
    probs = M.probabilities(logits, task)[0].tolist()
    thresholds, source = run_thresholds(os.path.dirname(checkpoint_path))
    print(
        f"{ct_path}: {args['model']} {'w/' if args['seg'] else 'w/o'} seg, thresholds from {source or 'none'}"
    )
    for name, p in zip(task.classes, probs):
        t = thresholds.get(name)
        verdict = "" if t is None else f"threshold {t:.3f}  " + ("POSITIVE" if p >= t else "negative")
        print(f"  {ABBREVIATIONS.get(name, ''):>7} {name:<36} p = {p:.3f}  {verdict}")
    if features:
        write_features(features, model, x, logits, probs, task)
        print(f"wrote {features}")
    if explain:
        paths = write_explanations(explain, model, x, crop, task, dict(zip(task.classes, probs)))
        print(f"wrote {len(paths)} evidence sheet(s) to {explain}")
    return dict(zip(task.classes, probs))


@torch.no_grad()
def write_explanations(folder, model, x, crop, task, probs):
    """One PNG per model output: its evidence map over the CT (and the seg head's anatomy), see the module."""
    # (outputs, D, H, W)
    maps = learning_report.upsample(evidence.evidence_maps(model, x), task.crop)[0].numpy()
    anatomy = inference.segment(model, x)[0].numpy() if model.seg_head is not None else None
    logits = model(x)[0].tolist()
    body = body_mask(crop)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, name in enumerate(output_names(task)):
        title = f"{name}: logit {logits[k]:.3f} = mean evidence + bias"
        title += f", p = {probs[name]:.3f}" if name in probs else ""
        paths.append(os.path.join(folder, f"evidence_{k:02d}_{name.replace(' ', '_')}.png"))
        draw_sheet(paths[-1], crop, body, maps[k], anatomy, task, title)
    return paths


def body_mask(crop):
    """Where the sheets look for the strongest evidence: the upsampled map is flat next to the crop's border,
    where its maximum often lies in the air around the patient, and planes through air show no anatomy. The
    body is each axial slice's tissue above BODY_HU with its holes (the lungs) filled; without any, the whole
    crop."""
    from scipy import ndimage  # used only here

    body = np.stack([ndimage.binary_fill_holes(axial > BODY_HU) for axial in crop])  # (D, H, W)
    return body if body.any() else np.ones_like(body)


def peak(evidence_map, body):
    """The voxel (z, y, x) of the strongest evidence inside `body`, where a sheet's planes cross."""
    return np.unravel_index(int(np.argmax(np.where(body, evidence_map, -np.inf))), evidence_map.shape)


def draw_sheet(path, crop, body, evidence_map, anatomy, task, title):
    """Axial, coronal and sagittal planes through the `peak` of the evidence inside `body` (`body_mask`): the
    CT in the task's window with the evidence overlaid (diverging, symmetric about 0), and a row of the seg
    head's anatomy if there is one."""
    import matplotlib  # optional for everything else: imported where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, y, x = peak(evidence_map, body)
    planes = {"axial": np.s_[z], "coronal": np.s_[:, y], "sagittal": np.s_[:, :, x]}
    # a pixel's height over its width in each plane: the crop's voxels are ct_io.SPACING (x, y, z) in mm
    aspect = {"axial": ct_io.SPACING[1] / ct_io.SPACING[0], "coronal": ct_io.SPACING[2] / ct_io.SPACING[0]}
    aspect["sagittal"] = ct_io.SPACING[2] / ct_io.SPACING[1]
    rows = 2 if anatomy is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4.2 * rows), squeeze=False)
    limit = float(np.abs(evidence_map).max()) or 1.0
    for col, (plane, where) in enumerate(planes.items()):
        for row in range(rows):
            ax = axes[row, col]
            ax.imshow(crop[where], cmap="gray", vmin=task.window[0], vmax=task.window[1], origin="lower")
            if row == 0:
                shown = ax.imshow(
                    evidence_map[where], cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.5, origin="lower"
                )
            else:
                labels = np.ma.masked_equal(anatomy[where], 0)
                ax.imshow(labels, cmap="tab20", vmin=0.5, vmax=20.5, alpha=0.45, origin="lower")
            ax.set_aspect(aspect[plane])  # after every imshow, which sets its own
            ax.set_title(plane if row == 0 else f"{plane}: seg head's anatomy", fontsize=9)
            ax.axis("off")
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="evidence (raises the logit > 0)")
    fig.suptitle(title, fontsize=10)
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ct", help="a NIfTI file, a RAD-ChestCT .npz or a DICOM series folder")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth / checkpoint_best.pth of a run")
    parser.add_argument("--explain", metavar="DIR", help="write an evidence sheet (PNG) per output")
    parser.add_argument("--features", metavar="FILE.npz", help="write the pooled features and probabilities")
    return parser


def cli(argv=None):
    """The command line: a CT or checkpoint that cannot be used ends in one line and exit status 1."""
    args = get_args_parser().parse_args(argv)
    try:
        predict(args.ct, args.checkpoint, args.explain, args.features)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot classify {args.ct}: {utils.one_line(error)}") from None


if __name__ == "__main__":
    cli()
