"""Does a phantom's nodule label need the case's own lobes? (docs/synthetic_study_fissures.md, §0)

A perfect nodule detector finds every nodule in the evaluated centre crop of a test phantom (connected
components of nodule tissue, above NODULE_HU, inside the lungs, of at least a third of the smallest nodule's
volume) and scores a case for a nodule class as the largest, over its nodules, of the probability that the
nodule lies in the class's lobe, knowing the lobes from
  (a) "position": the training-average lobe map at the evaluated crop (mean over the nodule's voxels);
  (b) "lung": the training-average lobe map in coordinates relative to the bounding box of the voxel's own
      lung (LUNG_BINS per axis), in the test case and the training cases alike: the case's lung outline, not
      its fissures;
  (c) "lobes": the case's true lobes (the fraction of the nodule's voxels in the lobe).
Case-level AUC per class. The design rule: (a) and (b) <= 0.75 and (c) >= 0.98 on both nodule classes.

    python docs/study/anatomy_scores.py --variant fissures --out docs/study/fissures
    python docs/study/anatomy_scores.py --variant default --out docs/study/fissures  # for comparison
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]
import data  # noqa: E402
from ctkit import synthetic, utils  # noqa: E402
from ctkit.ct_io import AIR_HU  # noqa: E402
from ctkit.learning_report import LUNG_BINS, lung_bins, lungs_of  # noqa: E402

KNOWLEDGE = ("position", "lung", "lobes")
# the phantoms' lobes of the left and the right lung: (1, 2), (3, 4, 5)
LUNGS = lungs_of(synthetic.SCHEME.values())
NODULE_HU = -300  # nodules are 40 HU, vessels -50 HU (far smaller), lung -850, fissures -700
RULE = dict(position=0.75, lung=0.75, lobes=0.98)  # (a), (b) at most; (c) at least


def evaluated_crops(split, n, task, variant):
    """(ct, mask, labels) of a split's phantoms, cut to the centre crop evaluation uses."""
    for ct, mask, labels, _ in synthetic.phantoms(split, n, pad=task.pad, variant=variant):
        starts = data.window_start(ct.shape, task.pad, task.crop)
        yield (
            data.read_window(ct, starts, task.crop, AIR_HU),
            data.read_window(mask, starts, task.crop, 0),
            labels,
        )


def training_maps(crops):
    """From training (mask) crops: the average lobe map (6 + 1, D, H, W) (the fraction of crops with each
    label per voxel) and the lung-relative one (6 + 1, LUNG_BINS, LUNG_BINS, LUNG_BINS) (per bin, the fraction
    of lung voxels in each lobe)."""
    position, lung, count = 0.0, np.zeros((7, *(LUNG_BINS,) * 3)), 0
    for mask in crops:
        position = position + np.stack([mask == label for label in range(7)])
        bins = lung_bins(mask, LUNGS)
        inside = bins[..., 0] >= 0
        np.add.at(lung, (mask[inside], *bins[inside].T), 1.0)
        count += 1
    return position / count, lung / np.maximum(lung.sum(0, keepdims=True), 1)


def nodules(ct, mask, min_voxels):
    """The nodules a perfect detector finds: [flat voxel indices] of each component of nodule tissue in the
    lungs with at least min_voxels voxels."""
    components, count = ndimage.label((ct > NODULE_HU) & (mask >= 1) & (mask <= 5))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    order = np.argsort(components.ravel(), kind="stable")
    ends = np.cumsum(sizes)
    return [order[ends[c - 1] : ends[c]] for c in range(1, count + 1) if sizes[c] >= min_voxels]


def case_scores(mask, found, lobe, maps):
    """The three scores of one case for one lobe: the largest probability, over its nodules `found`, that a
    nodule lies in the lobe, knowing (position, lung, lobes); 0 without a nodule."""
    position, lung = maps
    flat_bins = lung_bins(mask, LUNGS).reshape(-1, 3)
    scores = np.zeros(len(KNOWLEDGE))
    for voxels in found:
        b = flat_bins[voxels]
        b = b[b[:, 0] >= 0]
        in_lobe = np.mean(mask.ravel()[voxels] == lobe)
        candidate = (position[lobe].ravel()[voxels].mean(), lung[lobe][tuple(b.T)].mean(), in_lobe)
        scores = np.maximum(scores, candidate)
    return scores


def anatomy_scores(variant, crop, n_train, n_test):
    """(per-case rows [case, class, label, *scores], {class: {knowledge: AUC}}) on the test phantoms."""
    task = data.make_task("synthetic", crop)
    maps = training_maps(mask for _, mask, _ in evaluated_crops("train", n_train, task, variant))
    u = min(task.pad[1:]) / 60
    smallest = min(synthetic.FISSURES["radius"][0], synthetic.NODULES["radius"][0]) * u
    min_voxels = 4 / 3 * np.pi * smallest**3 / 3
    rows, per_class = [], {name: ([], []) for name, _ in synthetic.LOCALISED}
    for i, (ct, mask, labels) in enumerate(evaluated_crops("test", n_test, task, variant)):
        found = nodules(ct, mask, min_voxels)
        for k, (name, lobe) in enumerate(synthetic.LOCALISED):
            scores = case_scores(mask, found, lobe, maps)
            rows.append([f"synthetic_test_{i:04d}", name, int(labels[k]), *(f"{s:.4f}" for s in scores)])
            per_class[name][0].append(labels[k])
            per_class[name][1].append(scores)
    aucs = {}
    for name, (y, scores) in per_class.items():
        aucs[name] = {
            kind: float(roc_auc_score(y, np.array(scores)[:, j])) for j, kind in enumerate(KNOWLEDGE)
        }
    return rows, aucs


def meets_rule(aucs):
    at_most, at_least = ("position", "lung"), ("lobes",)
    return all(
        all(a[k] <= RULE[k] for k in at_most) and all(a[k] >= RULE[k] for k in at_least)
        for a in aucs.values()
    )


def draw(path, task, n=4):
    """Sagittal CT slices of the variant's first test phantoms with a right-lung nodule (n // 2 positive for
    NOD-RUL, n // 2 holding a decoy), through the nodule, with the lobes' outlines: which side of the fissure
    it lies on is the label."""
    import matplotlib  # only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, figsize=(3 * n, 4.4))
    shown = {0: 0, 1: 0}
    for ct, mask, labels in evaluated_crops("test", 40, task, "fissures"):
        label = int(labels[0])
        found = [v for v in nodules(ct, mask, 50) if np.isin(mask.ravel()[v], LUNGS[1]).all()]
        if not found or shown[label] == n // 2:
            continue
        column = 2 * shown[label] + label
        shown[label] += 1
        x = int(np.unravel_index(found[0], mask.shape)[2].mean())
        for ax in axes[:, column]:  # the CT alone, then with the lobes' outlines (2|3, 3|4, 4|5)
            ax.imshow(ct[:, :, x], cmap="gray", vmin=-1000, vmax=200, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
        axes[1, column].contour(mask[:, :, x], levels=[2.5, 3.5, 4.5], colors=["y", "c", "m"], linewidths=0.6)
        axes[0, column].set_title(f"NOD-RUL {'positive' if label else 'negative (decoy)'}", fontsize=8)
        axes[1, column].set_xlabel("sagittal: anterior to the right, superior up", fontsize=7)
        if sum(shown.values()) == n:
            break
    with utils.atomic_path(str(path)) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", default="fissures", choices=synthetic.VARIANTS)
    parser.add_argument("--crop", type=int, nargs=3, default=(64, 96, 96), metavar=("D", "H", "W"))
    parser.add_argument("--cases", type=int, nargs=2, default=(320, 200), metavar=("TRAIN", "TEST"))
    parser.add_argument("--out", type=Path, help="write anatomy_scores_<variant>.csv / .json here")
    parser.add_argument("--figure", type=Path, help="draw the variant's nodules and decoys (sagittal) here")
    args = parser.parse_args()
    if args.figure:
        draw(args.figure, data.make_task("synthetic", args.crop))
    rows, aucs = anatomy_scores(args.variant, args.crop, *args.cases)
    train, test = args.cases
    print(f"{args.variant} phantoms, crop {tuple(args.crop)}, {train} training / {test} test")
    print(f"{'case-level AUC':<26}" + "".join(f"{k:>10}" for k in KNOWLEDGE))
    for name, a in aucs.items():
        print(f"{name:<26}" + "".join(f"{a[k]:10.3f}" for k in KNOWLEDGE))
    print(f"design rule (a), (b) <= {RULE['position']}, (c) >= {RULE['lobes']}: met = {meets_rule(aucs)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"anatomy_scores_{args.variant}"
        utils.write_csv(f"{stem}.csv", ["case_id", "class", "label", *KNOWLEDGE], rows)
        settings = dict(variant=args.variant, crop=list(args.crop), cases=list(args.cases), rule=RULE)
        phantom = synthetic.FISSURES if args.variant == "fissures" else synthetic.NODULES
        utils.write_json(
            f"{stem}.json", dict(**settings, auc=aucs, meets_rule=meets_rule(aucs), phantom=phantom)
        )


if __name__ == "__main__":
    main()
