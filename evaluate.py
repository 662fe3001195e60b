"""Classification metrics from a predictions CSV (paper appendix A.5, Tables 6-9).

Per class: AUC-ROC; a ROC-optimal threshold (Youden's J = max(sensitivity + specificity - 1) by default,
chosen on the evaluated set as in the paper); at that threshold sensitivity, specificity, precision of the
positive class, F1 of the positive class and the support-weighted F1 over both classes (sklearn
average='weighted', the convention of CT-CLIP's evaluation that the paper's Table 6 follows). Macro averages
are over classes that have both positives and negatives; the others are listed and counted as skipped.

    python evaluate.py runs/synthetic_r3d_seg                  # uses predictions_test.csv in the run folder
    python evaluate.py runs/x/predictions_test.csv --threshold topleft

Writes metrics_<split>.csv and metrics_<split>.json next to the predictions.
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

METRICS = ("auc", "sensitivity", "specificity", "precision", "f1_weighted", "f1_positive")
ABBREVIATIONS = {  # paper Tables 7-9 and our synthetic classes
    # CT-RATE (Table 7)
    "Arterial wall calcification": "AWC", "Atelectasis": "ATL", "Bronchiectasis": "BRE", "Cardiomegaly": "CDM",
    "Consolidation": "CON", "Coronary artery wall calcification": "CAC", "Emphysema": "EMP", "Hiatal hernia": "HH",
    "Interlobular septal thickening": "IST", "Lung nodule": "LN", "Lung opacity": "LOP", "Lymphadenopathy": "LAP",
    "Medical material": "MM", "Mosaic attenuation pattern": "MAP", "Peribronchial thickening": "PBT",
    "Pericardial effusion": "PCE", "Pleural effusion": "PLE", "Pulmonary fibrotic sequela": "PFS",
    # RAD-ChestCT (Table 8)
    "catheter_or_port": "COP", "lymphadenopathy": "LAP", "septal_thickening": "ST", "hernia": "HER", "nodule": "NOD",
    "pericardial_effusion": "PCE", "scarring": "SCR", "bronchial_wall_thickening": "BWT", "opacity": "OPC",
    "emphysema": "EMP", "cardiomegaly": "CDM", "pleural_effusion": "PLE", "bronchiectasis": "BRE",
    "consolidation": "CON", "atelectasis": "ATL", "calcification": "CAL",
    # RATIC (Table 9)
    "any_injury": "AI", "bowel_healthy": "BH", "bowel_injury": "BI", "extravasation_healthy": "EH",
    "extravasation_injury": "EI", "kidney_healthy": "KH", "kidney_high": "KHI", "kidney_low": "KL",
    "liver_healthy": "LH", "liver_high": "LHI", "liver_low": "LL", "spleen_healthy": "SH", "spleen_high": "SHI",
    "spleen_low": "SL",
    # synthetic phantoms
    "nodule_right_upper_lobe": "NOD-RUL", "nodule_left_lower_lobe": "NOD-LLL",
}


def choose_threshold(y_true, y_score, method="youden"):
    """ROC-optimal threshold: Youden's J (max TPR - FPR) or the ROC point closest to (0, 1)."""
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    j = np.argmax(tpr - fpr) if method == "youden" else np.argmin(fpr ** 2 + (1 - tpr) ** 2)
    # roc_curve's first threshold is +inf ("predict nothing positive"); keep it finite for CSV/JSON
    return float(min(thresholds[j], np.nextafter(y_score.max(), np.inf)))


def class_metrics(y_true, y_score, method="youden"):
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64)
    threshold = choose_threshold(y_true, y_score, method)
    pred = (y_score >= threshold).astype(int)
    tp, fp = int(np.sum((pred == 1) & (y_true == 1))), int(np.sum((pred == 1) & (y_true == 0)))
    fn, tn = int(np.sum((pred == 0) & (y_true == 1))), int(np.sum((pred == 0) & (y_true == 0)))
    return {
        "auc": roc_auc_score(y_true, y_score), "threshold": threshold,
        "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f1_weighted": f1_score(y_true, pred, average="weighted"),
        "f1_positive": 2 * tp / (2 * tp + fp + fn),
        "positives": tp + fn, "negatives": tn + fp,
    }


def compute_metrics(y_true, y_prob, class_names, method="youden"):
    """y_true, y_prob: (N, K). Returns (rows per class, macro dict, skipped class names)."""
    rows, skipped = [], []
    for k, name in enumerate(class_names):
        if len(np.unique(y_true[:, k])) < 2:
            skipped.append(name)
            continue
        rows.append({"class": name, **class_metrics(y_true[:, k], y_prob[:, k], method)})
    macro = {m: float(np.mean([r[m] for r in rows])) if rows else math.nan for m in METRICS}
    macro.update(classes=len(rows), skipped=len(skipped))
    return rows, macro, skipped


def dice_counts(pred, target, num_labels):
    """Per case and foreground structure: (intersection, predicted, true) voxel counts, (B, num_labels - 1, 3)."""
    counts = []
    for label in range(1, num_labels):
        p, t = pred == label, target == label
        counts.append(torch.stack([(p & t).sum((1, 2, 3)), p.sum((1, 2, 3)), t.sum((1, 2, 3))], 1))
    return torch.stack(counts, 1)


def dice_summary(counts, structures):
    """Mean per-case Dice of each structure over the cases that contain it; counts (N, S, 3)."""
    counts = np.asarray(counts, dtype=np.float64)
    summary = {}
    for s, name in enumerate(structures):
        present = counts[:, s, 2] > 0
        dice = 2 * counts[present, s, 0] / (counts[present, s, 1] + counts[present, s, 2])
        summary[name] = {"dice": float(dice.mean()) if present.any() else math.nan, "cases": int(present.sum())}
    summary["mean"] = {"dice": float(np.nanmean([v["dice"] for v in summary.values()])), "cases": len(counts)}
    return summary


def write_json(path, obj):
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.tmp", path)


def read_predictions(path):
    """Predictions CSV (case_id, true:<class>..., prob:<class>...) -> (case ids, y_true, y_prob, class names)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    if not header or header[0] != "case_id":
        sys.exit(f"{path}: not a predictions CSV (first column must be case_id)")
    names = [h[len("true:"):] for h in header if h.startswith("true:")]
    if not names or [h[len("prob:"):] for h in header if h.startswith("prob:")] != names or not rows:
        sys.exit(f"{path}: needs matching true:<class> and prob:<class> columns and at least one row")
    k = len(names)
    values = np.array([[float(v) for v in r[1:1 + 2 * k]] for r in rows])
    return [r[0] for r in rows], values[:, :k], values[:, k:], names


def write_predictions(path, case_ids, y_true, y_prob, class_names):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id"] + [f"true:{c}" for c in class_names] + [f"prob:{c}" for c in class_names])
        for case, t, p in zip(case_ids, y_true, y_prob):
            writer.writerow([case] + [f"{v:g}" for v in t] + [f"{v:.6g}" for v in p])
    os.replace(tmp, path)


def format_table(rows, macro, skipped, method="youden"):
    head = f"{'class':<28}{'AUC':>7}{'Sens':>7}{'Spec':>7}{'Prec':>7}{'F1w':>7}{'F1pos':>7}{'thr':>8}{'pos/neg':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{ABBREVIATIONS.get(r['class'], '')} {r['class']}".strip()[:27]
        lines.append(f"{label:<28}" + "".join(f"{100 * r[m]:7.2f}" for m in METRICS)
                     + f"{r['threshold']:8.3f}{r['positives']:>5}/{r['negatives']:<4}")
    lines.append("-" * len(head))
    lines.append(f"{'macro (%d classes)' % macro['classes']:<28}" + "".join(f"{100 * macro[m]:7.2f}" for m in METRICS))
    threshold_name = "Youden's J" if method == "youden" else "closest to (0, 1)"
    lines.append(f"thresholds: {threshold_name} on the evaluated set; F1w = support-weighted F1 (CT-CLIP/paper), "
                 f"F1pos = F1 of the positive class")
    if skipped:
        lines.append(f"skipped {len(skipped)} class(es) with a single label value: {', '.join(skipped)}")
    return "\n".join(lines)


def evaluate_predictions(path, method="youden", quiet=False):
    """Compute, print and save (metrics_<split>.csv/.json beside `path`) the metrics of one predictions CSV."""
    _, y_true, y_prob, names = read_predictions(path)
    rows, macro, skipped = compute_metrics(y_true, y_prob, names, method)
    if not quiet:
        print(f"{path}: {len(y_true)} cases")
        print(format_table(rows, macro, skipped, method))
    stem = os.path.join(os.path.dirname(path), os.path.basename(path).replace("predictions", "metrics")[:-4])
    with open(f"{stem}.json.tmp", "w") as f:
        json.dump({"predictions": os.path.basename(path), "threshold": method, "cases": len(y_true),
                   "macro": macro, "skipped": skipped, "classes": rows}, f, indent=1)
    os.replace(f"{stem}.json.tmp", f"{stem}.json")
    with open(f"{stem}.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, ["class", *METRICS, "threshold", "positives", "negatives"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({"class": "macro", **{m: macro[m] for m in METRICS}})
    os.replace(f"{stem}.csv.tmp", f"{stem}.csv")
    return rows, macro


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run folder (uses its predictions_test.csv) or a predictions CSV")
    parser.add_argument("--threshold", default="youden", choices=("youden", "topleft"),
                        help="ROC-optimal threshold: Youden's J (default) or the point closest to (0, 1)")
    return parser


def main(args):
    path = os.path.join(args.path, "predictions_test.csv") if os.path.isdir(args.path) else args.path
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such predictions file")
    evaluate_predictions(path, args.threshold)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
