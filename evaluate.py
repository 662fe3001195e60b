"""Metrics of one run's predictions (paper A.5, Tables 6-9), and several runs side by side (Table 1).

Per class: AUC-ROC; a ROC-optimal threshold (Youden's J = max(sensitivity + specificity - 1) by default,
chosen on the evaluated set, or on the run's validation predictions with --thresholds-from val); at that
threshold sensitivity, specificity, precision of the positive class, F1 of the positive class and the
support-weighted F1 (sklearn average='weighted': CT-CLIP's convention, which the paper's Table 6 follows).
Macro averages are over the classes that have both labels; the others are counted as skipped.

    python evaluate.py runs/synthetic_r3d_seg_s0     # one run: per-class table (+ the seg head's report)
    python evaluate.py runs/*/ --figure fig3.png     # several runs: Tables 1, 6-9, CIs, Figure 3
    python evaluate.py runs/*/ --roc roc.png         # each finding's ROC curve, the arms overlaid
    python evaluate.py runs/*/ --evidence            # where each run's evidence lies among the structures
"""

import dataclasses
import math
import os

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

import data
from ctkit import compare, evidence, inference, prep, utils
from ctkit.labels import ABBREVIATIONS, read_predictions
from ctkit.learning_report import format_report
from ctkit.utils import BadInput, flag
from model import build_model

METRICS = ("auc", "sensitivity", "specificity", "precision", "f1_weighted", "f1_positive")


def choose_threshold(y_true, y_score, method="youden"):
    """ROC-optimal threshold: Youden's J (max TPR - FPR) or the ROC point closest to (0, 1)."""
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    j = np.argmax(tpr - fpr) if method == "youden" else np.argmin(fpr**2 + (1 - tpr) ** 2)
    # roc_curve's first threshold is +inf ("predict nothing positive"); keep it finite for CSV/JSON
    return float(min(thresholds[j], np.nextafter(y_score.max(), np.inf)))


def class_metrics(y_true, y_score, method="youden", threshold=None):
    y_true, y_score = np.asarray(y_true).astype(int), np.asarray(y_score, dtype=np.float64)
    threshold = choose_threshold(y_true, y_score, method) if threshold is None else threshold
    pred = (y_score >= threshold).astype(int)
    tp, fp = int(np.sum((pred == 1) & (y_true == 1))), int(np.sum((pred == 1) & (y_true == 0)))
    fn, tn = int(np.sum((pred == 0) & (y_true == 1))), int(np.sum((pred == 0) & (y_true == 0)))
    return {
        "auc": roc_auc_score(y_true, y_score),
        "threshold": threshold,
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f1_weighted": f1_score(y_true, pred, average="weighted"),
        "f1_positive": 2 * tp / (2 * tp + fp + fn),
        "positives": tp + fn,
        "negatives": tn + fp,
    }


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


def run_evidence(folder):
    """python evaluate.py RUN --evidence: the run's evaluated checkpoint over its test split with the masks;
    writes evidence_by_anatomy_test.{json,csv} and prints the table."""
    config = utils.read_json(os.path.join(folder, "config.json"))
    name = (
        "checkpoint_best.pth"
        if os.path.isfile(os.path.join(folder, "checkpoint_best.pth"))
        else "checkpoint.pth"
    )
    state = utils.load_checkpoint(os.path.join(folder, name))
    task = data.Task.from_dict(state["task"])
    if task.kind == "ratic" or (config.get("data_path") and not task.scheme):
        raise BadInput(
            f"{folder}: evidence by anatomy needs one output per finding and masks with a label scheme"
        )
    model = build_model(config["model"], task, config["seg"])
    model.load_state_dict(state["model"])
    source = data.Source.of_run(config, folder)
    anatomy = data.anatomy(config["structures"], source, task.region)
    if (anatomy.names, anatomy.ids, anatomy.stamp) != (task.structures, task.structure_ids, task.scheme):
        raise BadInput(f"{source.prep_dir}: its {prep.SCHEME} is not the label scheme the run was trained on")
    test = data.build_datasets(task, source, config["seed"], True, anatomy.lut)["test"]
    loader = data.make_loader(test, False, batch_size=4)
    shares = inference.evidence_split(model.eval(), loader, task)
    table = evidence.evidence_by_anatomy(shares, test.labels, task)
    utils.write_json(os.path.join(folder, "evidence_by_anatomy_test.json"), table)
    header = ["finding", *next(iter(table.values()))]
    rows = [[f, *row.values()] for f, row in table.items()]
    utils.write_csv(os.path.join(folder, "evidence_by_anatomy_test.csv"), header, rows)
    seg = "w/" if config["seg"] else "w/o"
    title = (
        f"{folder} ({config['model']} {seg} seg, {name}): share of the positive evidence in each structure"
    )
    print(evidence.format_evidence(table, title + ", mean over the finding's positive test cases"))
    return table


def format_table(rows, macro, skipped, threshold_note):
    columns = ("AUC", "Sens", "Spec", "Prec", "F1w", "F1pos")
    head = f"{'class':<28}" + "".join(f"{c:>7}" for c in columns) + f"{'thr':>8}{'pos/neg':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{ABBREVIATIONS.get(r['class'], '')} {r['class']}".strip()[:27]
        values = "".join(f"{100 * r[m]:7.2f}" for m in METRICS)
        lines.append(f"{label:<28}{values}{r['threshold']:8.3f}{r['positives']:>5}/{r['negatives']:<4}")
    macro_label = f"macro ({macro['classes']} classes)"
    lines += ["-" * len(head), f"{macro_label:<28}" + "".join(f"{100 * macro[m]:7.2f}" for m in METRICS)]
    notes = "F1w = support-weighted F1 (CT-CLIP/paper), F1pos = F1 of the positive class"
    lines.append(f"thresholds: {threshold_note}; {notes}")
    if skipped:
        lines.append(f"skipped {len(skipped)} class(es) with a single label value: {', '.join(skipped)}")
    return "\n".join(lines)


def validation_thresholds(path, method, per="auto"):
    """Thresholds chosen on the run's predictions_val.csv (beside `path`), per class with both labels."""
    val_path = os.path.join(os.path.dirname(path), "predictions_val.csv")
    if not os.path.isfile(val_path):
        raise BadInput(
            f"{val_path}: no validation predictions for --thresholds-from val (train with --val-fraction)"
        )
    val = read_predictions(val_path, per)
    y, p, classes = val["y_true"], val["y_prob"], val["classes"]
    both = [k for k in range(len(classes)) if len(np.unique(y[:, k])) == 2]
    return {classes[k]: choose_threshold(y[:, k], p[:, k], method) for k in both}, val_path


def beside(path):
    """(metrics stem, [Dice JSON, learning-report JSON] or [None, None]) of a predictions file:
    metrics_<split>.*, dice_<split>.json and seg_report_<split>.json beside predictions_<split>.csv;
    <name>.metrics.* beside a file of another name (never the input itself)."""
    folder, name = os.path.split(path)
    stem = name[: -len(".csv")] if name.endswith(".csv") else name
    if stem.startswith("predictions_"):
        split = stem[len("predictions_") :]
        seg_files = [os.path.join(folder, f"{kind}_{split}.json") for kind in ("dice", "seg_report")]
        return os.path.join(folder, f"metrics_{split}"), seg_files
    return os.path.join(folder, f"{stem}.metrics"), [None, None]


def evaluate_predictions(path, method="youden", thresholds_from="test", quiet=False, per="auto"):
    """Compute, print and save (metrics_<split>.csv/.json beside `path`) the metrics of a predictions CSV, per
    case or per patient (per="auto": per patient for RATIC, per case otherwise)."""
    predictions = read_predictions(path, per)
    y_true, y_prob, names = predictions["y_true"], predictions["y_prob"], predictions["classes"]
    method_name = "Youden's J" if method == "youden" else "closest to (0, 1)"
    thresholds, note = None, f"{method_name} on the evaluated set"
    if thresholds_from == "val":
        thresholds, val_path = validation_thresholds(path, method, per)
        note = f"{method_name} on the validation split ({val_path})"
        fallback = [
            c for k, c in enumerate(names) if c not in thresholds and len(np.unique(y_true[:, k])) == 2
        ]
        if fallback:  # one label value in the validation split: nothing to choose a threshold on there
            note += f"; on the evaluated set for {', '.join(fallback)} (a single label value in validation)"
    rows, macro, skipped = compute_metrics(y_true, y_prob, names, method, thresholds)
    stem, seg_files = beside(path)
    dice, report = (utils.read_json(p) if p and os.path.isfile(p) else None for p in seg_files)
    units = predictions.get("unit", "case")
    if not quiet:
        averaged = " (their cases' probabilities averaged)" if units == "patient" else ""
        print(f"{path}: {len(y_true)} {units}s{averaged}\n" + format_table(rows, macro, skipped, note))
        if dice:
            print("segmentation head Dice: " + "  ".join(f"{k} {v['dice']:.3f}" for k, v in dice.items()))
        if report:
            print(format_report(report, os.path.basename(stem).replace("metrics_", "")))
    summary = dict(predictions=os.path.basename(path), unit=units, thresholds=note, cases=len(y_true))
    summary.update(macro=macro, skipped=skipped, classes=rows, dice=dice, seg_report=report)
    utils.write_json(f"{stem}.json", summary)
    table = [
        [r["class"], *(r[m] for m in METRICS), r["threshold"], r["positives"], r["negatives"]] for r in rows
    ]
    table.append(["macro", *(macro[m] for m in METRICS), "", "", ""])
    utils.write_csv(f"{stem}.csv", ["class", *METRICS, "threshold", "positives", "negatives"], table)
    return rows, macro


def load_runs(folders, method, thresholds_from, per="auto"):
    """The runs of ctkit/compare.py: each run folder's config, test predictions (per case, or per patient for
    RATIC), metrics and seg head Dice."""
    runs = []
    for folder in folders:
        config_path, path = os.path.join(folder, "config.json"), os.path.join(folder, "predictions_test.csv")
        if not os.path.isfile(config_path):
            raise BadInput(f"{folder}: no config.json (not a run folder written by train.py)")
        if not os.path.isfile(path):
            raise BadInput(f"{path}: missing (did the run finish?)")
        config = utils.read_json(config_path)
        rows, macro = evaluate_predictions(path, method, thresholds_from, quiet=True, per=per)
        key = (config["dataset"], config["model"], bool(config.get("pretrained")), config["seg"])
        run = dict(
            folder=folder, key=key, seed=config["seed"], rows=rows, macro=macro, **read_predictions(path, per)
        )
        dice_path = os.path.join(folder, "dice_test.json")
        run["dice"] = utils.read_json(dice_path) if os.path.isfile(dice_path) else None
        runs.append(run)
    return runs


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to evaluate and how, and its command line, declared once (utils.flag)."""

    paths: tuple = flag((), "run folders (or one predictions CSV)", names=("paths",), nargs="+")
    threshold: str = flag("youden", "Youden's J, or closest to (0, 1)", choices=("youden", "topleft"))
    thresholds_from: str = flag("test", "evaluated set or validation", choices=("test", "val"))
    per: str = flag("auto", "auto: patient for RATIC", choices=("auto", "case", "patient"))
    bootstrap: int = flag(2000, "bootstrap resamples (several runs)", type=int)
    seed: int = flag(0, "bootstrap seed", type=int)
    figure: str | None = flag(None, "several runs: write Figure 3 (grad-norm and loss curves) to this PNG")
    output: str | None = flag(None, "several runs: text + JSON (default <first run>/../comparison.*)")
    roc: str | None = flag(None, "each finding's ROC curve (several runs: the arms overlaid)", metavar="PNG")
    evidence: bool = flag(False, "where each run's evidence lies among the structures", action="store_true")


def get_args_parser():
    return utils.args_parser(Settings, __doc__)


def compare_runs(s):
    """Several run folders side by side (ctkit/compare.py): <output>.txt / .json and Figure 3."""
    runs = load_runs(s.paths, s.threshold, s.thresholds_from, s.per)
    where = "validation split" if s.thresholds_from == "val" else "evaluated set"
    method = "Youden's J" if s.threshold == "youden" else "closest to (0, 1)"
    stem = s.output or os.path.join(os.path.dirname(os.path.abspath(s.paths[0].rstrip("/"))), "comparison")
    compare.write_comparison(
        runs, stem, s.bootstrap, s.seed, f"{len(runs)} runs; thresholds: {method} on the {where}"
    )
    if s.figure:
        compare.figure3(runs, s.figure)
        print(f"wrote {s.figure}")
    if s.roc:
        compare.roc_figure(runs, s.roc)
        print(f"wrote {s.roc}")


def main(args):
    s = Settings(**{**vars(args), "paths": tuple(args.paths)})
    if s.evidence:  # per run folder: its checkpoint over its test split (a model run, not the predictions)
        return [run_evidence(folder) for folder in s.paths]
    if len(s.paths) > 1:
        return compare_runs(s)
    path = s.paths[0]
    path = os.path.join(path, "predictions_test.csv") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such predictions file")
    result = evaluate_predictions(path, s.threshold, s.thresholds_from, per=s.per)
    if s.roc:  # one run: its curves, coloured by its arm where its config.json says
        config_path = os.path.join(os.path.dirname(path), "config.json")
        seg = bool(utils.read_json(config_path)["seg"]) if os.path.isfile(config_path) else False
        compare.roc_figure([{**read_predictions(path, s.per), "key": (None, None, None, seg)}], s.roc)
        print(f"wrote {s.roc}")
    return result


def cli(argv=None):
    """The command line: unusable input ends in one line and exit status 1."""
    try:
        main(get_args_parser().parse_args(argv))
    except (BadInput, OSError) as error:
        raise SystemExit(utils.one_line(error)) from None


if __name__ == "__main__":
    cli()
