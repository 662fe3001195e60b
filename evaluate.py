"""Metrics, comparison tables with confidence intervals, Figure 3, and prediction of one CT (paper A.5, §3).

Per class: AUC-ROC; a ROC-optimal threshold (Youden's J = max(sensitivity + specificity - 1) by default, chosen
on the evaluated set as in the paper, or on the run's validation predictions with --thresholds-from val); at
that threshold sensitivity, specificity, precision of the positive class, F1 of the positive class and the
support-weighted F1 (sklearn average='weighted': CT-CLIP's convention, which the paper's Table 6 follows).
Macro averages are over the classes that have both labels; the others are counted as skipped.

    python evaluate.py runs/synthetic_r3d_seg_s0            # one run: per-class table (+ Dice of the seg head)
    python evaluate.py runs/*/ --figure fig3.png            # Tables 1, 6, 7-9 layouts, paired bootstrap, Figure 3
    python evaluate.py --predict scan.nii.gz --checkpoint runs/x/checkpoint_best.pth

Several runs are grouped by (dataset, model, pretrained, seg) from their config.json; seeds of one group are
averaged (mean +- std). w/ vs w/o seg: paired bootstrap over the test cases (resampled jointly for all runs
of both groups), 95% percentile CI and two-sided p-value of the difference of macro AUC.
"""
import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

import data
import synthetic

METRICS = ("auc", "sensitivity", "specificity", "precision", "f1_weighted", "f1_positive")
ABBREVIATIONS = {**data.CTRATE_CLASSES, **data.RADCHEST_CLASSES, **data.RATIC_COLUMNS, **synthetic.SYNTHETIC_CLASSES}
MODEL_NAMES = {"r3d": "ResNet", "mvit": "MViT", "swin": "Swin3D"}


def choose_threshold(y_true, y_score, method="youden"):
    """ROC-optimal threshold: Youden's J (max TPR - FPR) or the ROC point closest to (0, 1)."""
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    j = np.argmax(tpr - fpr) if method == "youden" else np.argmin(fpr ** 2 + (1 - tpr) ** 2)
    # roc_curve's first threshold is +inf ("predict nothing positive"); keep it finite for CSV/JSON
    return float(min(thresholds[j], np.nextafter(y_score.max(), np.inf)))


def class_metrics(y_true, y_score, method="youden", threshold=None):
    y_true, y_score = np.asarray(y_true).astype(int), np.asarray(y_score, dtype=np.float64)
    threshold = choose_threshold(y_true, y_score, method) if threshold is None else threshold
    pred = (y_score >= threshold).astype(int)
    tp, fp = int(np.sum((pred == 1) & (y_true == 1))), int(np.sum((pred == 1) & (y_true == 0)))
    fn, tn = int(np.sum((pred == 0) & (y_true == 1))), int(np.sum((pred == 0) & (y_true == 0)))
    return {"auc": roc_auc_score(y_true, y_score), "threshold": threshold,
            "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "f1_weighted": f1_score(y_true, pred, average="weighted"), "f1_positive": 2 * tp / (2 * tp + fp + fn),
            "positives": tp + fn, "negatives": tn + fp}


def compute_metrics(y_true, y_prob, class_names, method="youden", thresholds=None):
    """y_true, y_prob: (N, K); thresholds: {class: value} to apply instead of choosing them here.
    Returns (rows per class, macro dict, skipped class names)."""
    rows, skipped = [], []
    for k, name in enumerate(class_names):
        if len(np.unique(y_true[:, k])) < 2:
            skipped.append(name)
            continue
        given = None if thresholds is None else thresholds.get(name)
        rows.append({"class": name, **class_metrics(y_true[:, k], y_prob[:, k], method, given)})
    macro = {m: float(np.mean([r[m] for r in rows])) if rows else math.nan for m in METRICS}
    macro.update(classes=len(rows), skipped=len(skipped))
    return rows, macro, skipped


def auc_columns(y_true, y_score):
    """AUC of every column at once (Mann-Whitney with mid-ranks, i.e. ties count 1/2); NaN for one-label columns."""
    positives = y_true.sum(0)
    pairs = positives * (len(y_true) - positives)
    rank_sum = (rankdata(y_score, axis=0) * y_true).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (rank_sum - positives * (positives + 1) / 2) / pairs, np.nan)


def paired_bootstrap(y_true, probs_a, probs_b, resamples=1000, seed=0):
    """Δ = mean macro AUC of runs A - that of runs B, all evaluated on the same cases (lists of (N, K) arrays).
    Cases are resampled jointly for every run. Returns (Δ, CI low, CI high, two-sided p-value)."""
    def delta(idx):
        y = y_true[idx]
        both = (y.min(0) == 0) & (y.max(0) == 1)  # classes with both labels in this resample
        macro = lambda runs: np.mean([auc_columns(y[:, both], p[idx][:, both]).mean() for p in runs])
        return macro(probs_a) - macro(probs_b)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples = np.array([delta(rng.integers(0, n, n)) for _ in range(resamples)])
    low, high = np.percentile(samples, [2.5, 97.5])
    p_value = min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0)))
    return float(delta(np.arange(n))), float(low), float(high), float(p_value)


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
    values = np.array([[float(v) for v in r[1:1 + 2 * len(names)]] for r in rows])
    return [r[0] for r in rows], values[:, :len(names)], values[:, len(names):], names


def write_predictions(path, case_ids, y_true, y_prob, class_names):
    with open(f"{path}.tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id"] + [f"true:{c}" for c in class_names] + [f"prob:{c}" for c in class_names])
        for case, t, p in zip(case_ids, y_true, y_prob):
            writer.writerow([case] + [f"{v:g}" for v in t] + [f"{v:.6g}" for v in p])
    os.replace(f"{path}.tmp", path)


def format_table(rows, macro, skipped, threshold_note):
    head = f"{'class':<28}{'AUC':>7}{'Sens':>7}{'Spec':>7}{'Prec':>7}{'F1w':>7}{'F1pos':>7}{'thr':>8}{'pos/neg':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{ABBREVIATIONS.get(r['class'], '')} {r['class']}".strip()[:27]
        lines.append(f"{label:<28}" + "".join(f"{100 * r[m]:7.2f}" for m in METRICS)
                     + f"{r['threshold']:8.3f}{r['positives']:>5}/{r['negatives']:<4}")
    lines += ["-" * len(head), f"{'macro (%d classes)' % macro['classes']:<28}" + "".join(f"{100 * macro[m]:7.2f}" for m in METRICS),
              f"thresholds: {threshold_note}; F1w = support-weighted F1 (CT-CLIP/paper), F1pos = F1 of the positive class"]
    if skipped:
        lines.append(f"skipped {len(skipped)} class(es) with a single label value: {', '.join(skipped)}")
    return "\n".join(lines)


def evaluate_predictions(path, method="youden", thresholds_from="test", quiet=False):
    """Compute, print and save (metrics_<split>.csv/.json beside `path`) the metrics of one predictions CSV."""
    _, y_true, y_prob, names = read_predictions(path)
    method_name = "Youden's J" if method == "youden" else "closest to (0, 1)"
    thresholds, note = None, f"{method_name} on the evaluated set (as the paper)"
    if thresholds_from == "val":
        val_path = os.path.join(os.path.dirname(path), "predictions_val.csv")
        if not os.path.isfile(val_path):
            sys.exit(f"{val_path}: no validation predictions for --thresholds-from val (train with --val-fraction)")
        _, val_true, val_prob, _ = read_predictions(val_path)
        thresholds = {c: choose_threshold(val_true[:, k], val_prob[:, k], method)
                      for k, c in enumerate(names) if len(np.unique(val_true[:, k])) == 2}
        note = f"{method_name} on the validation split ({val_path})"
    rows, macro, skipped = compute_metrics(y_true, y_prob, names, method, thresholds)
    dice_path = path.replace("predictions_", "dice_").replace(".csv", ".json")
    dice = json.load(open(dice_path)) if os.path.isfile(dice_path) else None
    if not quiet:
        print(f"{path}: {len(y_true)} cases\n" + format_table(rows, macro, skipped, note))
        if dice:
            print("segmentation head Dice: " + "  ".join(f"{k} {v['dice']:.3f}" for k, v in dice.items()))
    stem = path[:-4].replace("predictions_", "metrics_")
    write_json(f"{stem}.json", {"predictions": os.path.basename(path), "thresholds": note, "cases": len(y_true),
                                "macro": macro, "skipped": skipped, "classes": rows, "dice": dice})
    with open(f"{stem}.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, ["class", *METRICS, "threshold", "positives", "negatives"])
        writer.writeheader()
        writer.writerows(rows + [{"class": "macro", **{m: macro[m] for m in METRICS}}])
    os.replace(f"{stem}.csv.tmp", f"{stem}.csv")
    return rows, macro


# ----------------------------------------------------------------------------- several runs: tables 1, 6, 7-9

def load_runs(folders, method, thresholds_from):
    runs = []
    for folder in folders:
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            sys.exit(f"{folder}: no config.json (not a run folder written by train.py)")
        config = json.load(open(config_path))
        path = os.path.join(folder, "predictions_test.csv")
        if not os.path.isfile(path):
            sys.exit(f"{path}: missing (did the run finish?)")
        cases, y_true, y_prob, names = read_predictions(path)
        rows, macro = evaluate_predictions(path, method, thresholds_from, quiet=True)
        dice_path = os.path.join(folder, "dice_test.json")
        runs.append({"folder": folder, "key": (config["dataset"], config["model"], bool(config.get("pretrained")),
                                               config["seg"]), "seed": config["seed"], "cases": cases,
                     "y_true": y_true, "y_prob": y_prob, "classes": names, "rows": rows, "macro": macro,
                     "dice": json.load(open(dice_path)) if os.path.isfile(dice_path) else None})
    return runs


def cell(values, scale=100):
    values = scale * np.asarray(values, dtype=float)
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def comparison_report(runs, resamples=1000, seed=0):
    """Text of Table 1/6-style comparisons, the paired bootstrap, per-class AUC (Tables 7-9) and Dice; rows."""
    groups = defaultdict(list)
    for run in runs:
        groups[run["key"]].append(run)
    lines, records = [], []
    datasets = sorted({k[0] for k in groups})
    for dataset in datasets:
        lines.append(f"\n== {dataset}: macro metrics (%), mean ± std over seeds; Δ = w/ seg - w/o seg")
        lines.append(f"{'model':<22}{'metric':<8}{'w/o seg':>16}{'w/ seg':>16}{'Δ':>9}")
        for pretrained in (False, True):
            for model in MODEL_NAMES:
                off, on = groups.get((dataset, model, pretrained, False)), groups.get((dataset, model, pretrained, True))
                if not off and not on:
                    continue
                name = MODEL_NAMES[model] + (" + pretrained" if pretrained else "")
                for metric in ("auc", "sensitivity", "specificity", "f1_weighted", "precision"):
                    a = [r["macro"][metric] for r in off or []]
                    b = [r["macro"][metric] for r in on or []]
                    delta = f"{100 * (np.mean(b) - np.mean(a)):+.2f}" if a and b else ""
                    lines.append(f"{name:<22}{metric[:7]:<8}{cell(a) if a else '-':>16}{cell(b) if b else '-':>16}{delta:>9}")
                    records.append({"dataset": dataset, "model": model, "pretrained": pretrained, "metric": metric,
                                    "without_seg": a, "with_seg": b})
                if off and on:
                    reference = off[0]
                    for r in off + on:
                        if r["cases"] != reference["cases"]:
                            sys.exit(f"{r['folder']} and {reference['folder']} were evaluated on different cases")
                    d, low, high, p = paired_bootstrap(reference["y_true"], [r["y_prob"] for r in on],
                                                       [r["y_prob"] for r in off], resamples, seed)
                    lines.append(f"{'':<22}paired bootstrap ({resamples} resamples of {len(reference['cases'])} cases, "
                                 f"{len(off)} vs {len(on)} run(s)): Δ AUC {100 * d:+.2f}, 95% CI [{100 * low:+.2f}, "
                                 f"{100 * high:+.2f}], p = {p:.3f}")
                    records.append({"dataset": dataset, "model": model, "pretrained": pretrained, "metric": "delta_auc",
                                    "delta": d, "ci": [low, high], "p": p, "resamples": resamples})
        lines.append(f"\n== {dataset}: AUC (%) per class (Tables 7-9), mean over seeds")
        classes = next(r["classes"] for r in runs if r["key"][0] == dataset)
        lines.append(f"{'':<16}" + "".join(f"{ABBREVIATIONS.get(c, c[:6]):>8}" for c in classes) + f"{'AVG':>8}")
        for key in sorted((k for k in groups if k[0] == dataset), key=lambda k: (k[2], list(MODEL_NAMES).index(k[1]), k[3])):
            aucs = [{r["class"]: r["auc"] for r in run["rows"]} for run in groups[key]]
            label = MODEL_NAMES[key[1]][0] + (" + P" if key[2] else "") + (" + S" if key[3] else "")
            lines.append(f"{label:<16}" + "".join(f"{100 * np.mean([a.get(c, np.nan) for a in aucs]):8.1f}" for c in classes)
                         + f"{100 * np.mean([r['macro']['auc'] for r in groups[key]]):8.2f}")
        for key in sorted(k for k in groups if k[0] == dataset and k[3]):
            dice = [r["dice"] for r in groups[key] if r["dice"]]
            if dice:
                lines.append(f"seg head Dice ({MODEL_NAMES[key[1]]}{' + P' if key[2] else ''}, test): " + "  ".join(
                    f"{s} {np.nanmean([d[s]['dice'] for d in dice]):.3f}" for s in dice[0]))
    return "\n".join(lines), records


def smoothed(values, span):
    """Time-weighted (debiased) exponential moving average, as TensorBoard's smoothing."""
    weight, average, norm, out = 1 - 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        average, norm = weight * average + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def figure3(runs, path):
    """Gradient norm and training loss per iteration, raw and smoothed, w/ (red) vs w/o (blue) seg (Figure 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = ["-", "--", ":", "-."]
    for run in sorted(runs, key=lambda r: (r["key"], r["seed"])):
        with open(os.path.join(run["folder"], "iterations.csv")) as f:
            rows = np.array([[float(v) for v in r[1:6]] for r in csv.reader(f)])  # iteration, loss, cls, seg, grad
        color = "tab:red" if run["key"][3] else "tab:blue"
        label = f"{MODEL_NAMES[run['key'][1]]} {'w/' if run['key'][3] else 'w/o'} seg, seed {run['seed']}"
        span = max(10, len(rows) // 50)
        for ax, column in zip(axes, (4, 1)):
            ax.plot(rows[:, 0], rows[:, column], color=color, alpha=0.15, lw=0.6)
            ax.plot(rows[:, 0], smoothed(rows[:, column], span), color=color, lw=2,
                    ls=styles[run["seed"] % len(styles)], label=label)
    for ax, title in zip(axes, ("gradient norm (before clipping)", "training loss (cls + seg)")):
        ax.set_xlabel("iteration")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- one new CT

def predict(ct_path, checkpoint_path):
    """Preprocess one CT as make_masks.py does, centre-crop it, and print class probabilities and findings at the
    run's thresholds (from metrics_val.json if the run has a validation split, else metrics_test.json)."""
    import make_masks
    from model import CTClassifier, num_outputs, probabilities
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    args, info = state["args"], state["args"]["info"]
    model = CTClassifier(args["model"], num_outputs(info["task"], len(info["classes"])), tuple(info["crop"]),
                         seg_classes=len(info["structures"]) + 1 if args["seg"] else 0)
    model.load_state_dict(state["model"])
    kind = "dicom" if os.path.isdir(ct_path) else "npz" if ct_path.endswith(".npz") else "nifti"
    ct, _ = make_masks.preprocess_ct(*make_masks.read_case(kind, ct_path, None))
    ct = ct.transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)
    crop = data.read_window(ct, data.window_start(ct.shape, info["pad"], info["crop"]), tuple(info["crop"]), data.AIR_HU)
    with torch.no_grad():
        logits = model.eval()(data.normalize(torch.from_numpy(crop)[None, None], info["window"]))
    probs = probabilities(logits, info["task"], info["classes"])[0].numpy()
    folder = os.path.dirname(checkpoint_path)
    metrics = next((os.path.join(folder, f) for f in ("metrics_val.json", "metrics_test.json")
                    if os.path.isfile(os.path.join(folder, f))), None)
    thresholds = {r["class"]: r["threshold"] for r in json.load(open(metrics))["classes"]} if metrics else {}
    print(f"{ct_path}: {args['model']} {'w/' if args['seg'] else 'w/o'} seg, thresholds from {metrics or 'none'}")
    for name, p in zip(info["classes"], probs):
        t = thresholds.get(name)
        finding = "" if t is None else ("POSITIVE" if p >= t else "negative")
        print(f"  {ABBREVIATIONS.get(name, ''):>7} {name:<36} p = {p:.3f}  " + (f"threshold {t:.3f}  {finding}" if t is not None else ""))
    return dict(zip(info["classes"], probs.tolist()))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run folders (or one predictions CSV)")
    parser.add_argument("--threshold", default="youden", choices=("youden", "topleft"),
                        help="ROC-optimal threshold: Youden's J (default) or the point closest to (0, 1)")
    parser.add_argument("--thresholds-from", default="test", choices=("test", "val"),
                        help="choose thresholds on the evaluated set (paper) or on the run's validation split")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--figure", default=None, help="write Figure 3 (grad-norm and loss curves) to this PNG")
    parser.add_argument("--output", default=None, help="comparison text + JSON (default: <first run>/../comparison.*)")
    parser.add_argument("--predict", metavar="CT", help="a NIfTI file, .npz or DICOM folder to classify")
    parser.add_argument("--checkpoint", help="with --predict: checkpoint.pth / checkpoint_best.pth of a run")
    return parser


def main(args):
    if args.predict:
        if not args.checkpoint:
            sys.exit("--predict needs --checkpoint")
        return predict(args.predict, args.checkpoint)
    if len(args.paths) == 1:
        path = args.paths[0]
        path = os.path.join(path, "predictions_test.csv") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            sys.exit(f"{path}: no such predictions file")
        return evaluate_predictions(path, args.threshold, args.thresholds_from)
    if not args.paths:
        sys.exit("give run folders, a predictions CSV, or --predict CT --checkpoint CKPT")
    runs = load_runs(args.paths, args.threshold, args.thresholds_from)
    text, records = comparison_report(runs, args.bootstrap, args.seed)
    note = "Youden's J" if args.threshold == "youden" else "closest to (0, 1)"
    text = f"{len(runs)} runs; thresholds: {note} on the {'validation split' if args.thresholds_from == 'val' else 'evaluated set (as the paper)'}" + text
    print(text)
    stem = args.output or os.path.join(os.path.dirname(os.path.abspath(args.paths[0].rstrip("/"))), "comparison")
    with open(f"{stem}.txt", "w") as f:
        f.write(text + "\n")
    write_json(f"{stem}.json", records)
    print(f"\nwrote {stem}.txt and {stem}.json")
    if args.figure:
        figure3(runs, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
