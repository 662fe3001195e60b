"""Several runs side by side: Tables 1 and 6-9 layouts, bootstrap confidence intervals, Figure 3 (paper §3).

    python evaluate.py runs/*/ --figure fig3.png    # evaluate.py reads the runs, hands them to this module

A run is a dict: folder, key (dataset, model, pretrained, seg) from its config.json, seed, the per-class rows
and macro metrics of its test predictions, its predictions (labels.read_predictions) and its Dice. Runs are
grouped by key; the seeds of one group are
averaged (mean +- std). w/ vs w/o seg: a paired bootstrap over the test cases (resampled jointly for all runs
of both groups), with the 95% percentile CI and two-sided p-value of the difference of macro AUC.
"""

import os
from collections import defaultdict

import numpy as np
from scipy.stats import rankdata

from ctkit import utils
from ctkit.labels import ABBREVIATIONS

MODEL_NAMES = {"r3d": "ResNet", "mvit": "MViT", "swin": "Swin3D"}


def auc_columns(y_true, y_score):
    """AUC of every column at once (Mann-Whitney, mid-ranks: ties count 1/2); NaN for one-label columns."""
    positives = y_true.sum(0)
    pairs = positives * (len(y_true) - positives)
    rank_sum = (rankdata(y_score, axis=0) * y_true).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (rank_sum - positives * (positives + 1) / 2) / pairs, np.nan)


def mean_macro_auc(y_true, runs):
    """Mean over runs of the macro AUC over the classes that have both labels in y_true."""
    both = (y_true.min(0) == 0) & (y_true.max(0) == 1)
    if not both.any():  # a resample of a tiny set can leave no class with both labels
        return np.nan
    return np.mean([auc_columns(y_true[:, both], p[:, both]).mean() for p in runs])


def paired_bootstrap(y_true, probs_a, probs_b, resamples=2000, seed=0, seeds_too=False):
    """Δ = mean macro AUC of runs A - that of runs B, all evaluated on the same cases (lists of (N, K)).
    Each resample draws the cases with replacement, the same cases for every run (paired): the CI covers
    test-case sampling only. With seeds_too, each resample first draws the runs (seeds) of each arm with
    replacement (a two-level bootstrap): the CI then covers training randomness too.
    Returns (Δ, CI low, CI high, two-sided p-value)."""
    rng = np.random.default_rng(seed)
    n, samples = len(y_true), []
    for _ in range(resamples):
        runs_a, runs_b = probs_a, probs_b
        if seeds_too:
            runs_a = [probs_a[i] for i in rng.integers(0, len(probs_a), len(probs_a))]
            runs_b = [probs_b[i] for i in rng.integers(0, len(probs_b), len(probs_b))]
        idx = rng.integers(0, n, n)
        a, b = (
            mean_macro_auc(y_true[idx], [p[idx] for p in runs_a]),
            mean_macro_auc(y_true[idx], [p[idx] for p in runs_b]),
        )
        samples.append(a - b)
    samples = np.array(samples)
    samples = samples[np.isfinite(samples)]
    low, high = np.percentile(samples, [2.5, 97.5])
    p_value = min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0)))
    delta = mean_macro_auc(y_true, probs_a) - mean_macro_auc(y_true, probs_b)
    return float(delta), float(low), float(high), float(p_value)


def p_text(p, resamples):
    """A bootstrap p-value: where no resample crossed 0 it is only known to lie below 2 / resamples."""
    return f"p < {2 / resamples:.3f}" if p == 0 else f"p = {p:.3f}"


def ci(low, high):
    """An interval of AUC differences in percentage points."""
    return f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def cell(values, scale=100):
    values = scale * np.asarray(values, dtype=float)
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def macro_table(groups, dataset, resamples, seed):
    """Table 1 / 6 layout of one dataset, with the paired bootstrap under each w/o vs w/ seg pair."""
    lines = [
        f"\n== {dataset}: macro metrics (%), mean ± std over seeds; Δ = w/ seg - w/o seg",
        f"{'model':<22}{'metric':<8}{'w/o seg':>16}{'w/ seg':>16}{'Δ':>9}",
    ]
    records = []
    for pretrained in (False, True):
        for model in MODEL_NAMES:
            off, on = (
                groups.get((dataset, model, pretrained, False), []),
                groups.get((dataset, model, pretrained, True), []),
            )
            if not off and not on:
                continue
            name = MODEL_NAMES[model] + (" + pretrained" if pretrained else "")
            for metric in ("auc", "sensitivity", "specificity", "f1_weighted", "precision"):
                a, b = [r["macro"][metric] for r in off], [r["macro"][metric] for r in on]
                delta = f"{100 * (np.mean(b) - np.mean(a)):+.2f}" if a and b else ""
                cells = f"{cell(a) if a else '-':>16}{cell(b) if b else '-':>16}"
                lines.append(f"{name:<22}{metric[:7]:<8}{cells}{delta:>9}")
                records.append(
                    {
                        "dataset": dataset,
                        "model": model,
                        "pretrained": pretrained,
                        "metric": metric,
                        "without_seg": a,
                        "with_seg": b,
                    }
                )
            if off and on:
                line, record = bootstrap_line(off, on, resamples, seed)
                lines.append(line)
                records.append({"dataset": dataset, "model": model, "pretrained": pretrained, **record})
    return lines, records


def bootstrap_line(off, on, resamples, seed):
    """The paired case bootstrap and the two-level (seeds, then cases) bootstrap of Δ macro AUC."""
    reference = off[0]
    for run in off + on:
        if run["cases"] != reference["cases"]:
            raise utils.BadInput(
                f"{run['folder']} and {reference['folder']} were evaluated on different cases"
            )
    y, a, b = reference["y_true"], [r["y_prob"] for r in on], [r["y_prob"] for r in off]
    d, low, high, p = paired_bootstrap(y, a, b, resamples, seed)
    _, low2, high2, p2 = paired_bootstrap(y, a, b, resamples, seed, seeds_too=True)
    sizes = f"{resamples} resamples, {len(reference['cases'])} cases, {len(off)} vs {len(on)} run(s)"
    line = (
        f"{'':<22}Δ AUC {100 * d:+.2f}; 95% CI over test cases {ci(low, high)}, {p_text(p, resamples)}; "
        f"over seeds and cases (two-level) {ci(low2, high2)}, {p_text(p2, resamples)} ({sizes})"
    )
    record = dict(metric="delta_auc", delta=d, ci=[low, high], p=p, ci_seeds_and_cases=[low2, high2])
    return line, {**record, "p_seeds_and_cases": p2, "resamples": resamples}


def per_class_table(groups, runs, dataset):
    """AUC per class (Tables 7-9 layout: R, R + S, R + P, R + P + S, ...) and the seg head's Dice."""
    lines = [f"\n== {dataset}: AUC (%) per class (Tables 7-9), mean over seeds"]
    classes = next(r["classes"] for r in runs if r["key"][0] == dataset)
    lines.append(f"{'':<16}" + "".join(f"{ABBREVIATIONS.get(c, c[:6]):>8}" for c in classes) + f"{'AVG':>8}")
    keys = sorted(
        (k for k in groups if k[0] == dataset), key=lambda k: (k[2], list(MODEL_NAMES).index(k[1]), k[3])
    )
    for key in keys:
        aucs = [{r["class"]: r["auc"] for r in run["rows"]} for run in groups[key]]
        label = MODEL_NAMES[key[1]][0] + (" + P" if key[2] else "") + (" + S" if key[3] else "")
        values = "".join(f"{100 * np.mean([a.get(c, np.nan) for a in aucs]):8.1f}" for c in classes)
        lines.append(f"{label:<16}{values}{100 * np.mean([r['macro']['auc'] for r in groups[key]]):8.2f}")
    lines += sharpness_lines(groups, keys)
    for key in (k for k in keys if k[3]):
        dice = [r["dice"] for r in groups[key] if r["dice"]]
        if dice:
            values = "  ".join(f"{s} {np.nanmean([d[s]['dice'] for d in dice]):.3f}" for s in dice[0])
            lines.append(f"seg head Dice ({MODEL_NAMES[key[1]]}{' + P' if key[2] else ''}, test): {values}")
    return lines


def sharpness_lines(groups, keys):
    """Flatness of the evaluated checkpoints (sharpness.py's sharpness.json), mean ± std over seeds."""
    lines = []
    for key in keys:
        found = [
            utils.read_json(p)
            for r in groups[key]
            if os.path.isfile(p := os.path.join(r["folder"], "sharpness.json"))
        ]
        if found:
            values = {m: [f[m] for f in found] for m in ("lambda_max", "increase_0.02", "increase_0.05")}
            spread = {m: f" ± {np.std(v, ddof=1):.2g}" if len(v) > 1 else "" for m, v in values.items()}
            shown = "  ".join(f"{m} {np.mean(v):.4g}{spread[m]}" for m, v in values.items())
            label = MODEL_NAMES[key[1]] + (" + P" if key[2] else "") + (" + S" if key[3] else "")
            lines.append(f"sharpness ({label}, classification loss, {len(found)} run(s)): {shown}")
    return lines


def comparison_report(runs, resamples=1000, seed=0):
    """Text of the Table 1/6-style comparisons, bootstrap, per-class AUC (Tables 7-9), Dice; JSON records."""
    groups = defaultdict(list)
    for run in runs:
        groups[run["key"]].append(run)
    lines, records = [], []
    for dataset in sorted({k[0] for k in groups}):
        table, rows = macro_table(groups, dataset, resamples, seed)
        lines += table + per_class_table(groups, runs, dataset)
        records += rows
    return "\n".join(lines), records


def smoothed(values, span):
    """Time-weighted (debiased) exponential moving average, as TensorBoard's smoothing."""
    weight, average, norm, out = 1 - 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        average, norm = weight * average + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def figure3(runs, path):
    """Figure 3: gradient norm of all parameters and, comparable between the arms, of the backbone alone (the
    w/ seg arm's total includes its seg head), total training loss (cls + seg) and, comparable, the
    classification loss alone, per iteration, raw and smoothed; w/ seg in red, w/o in blue."""
    import matplotlib  # optional for everything else: imported where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "grad_norm": "gradient norm, all parameters (before clipping)",
        "backbone_grad_norm": "gradient norm, backbone (comparable between arms)",
        "loss": "training loss (cls + seg)",
        "cls_loss": "classification loss (comparable between arms)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(24, 4.2))
    for run in sorted(runs, key=lambda r: (r["key"], r["seed"])):
        log = utils.read_log(os.path.join(run["folder"], "iterations.csv"), utils.StepLog.FIELDS)
        iteration = [int(r["iteration"]) for r in log]
        color = "tab:red" if run["key"][3] else "tab:blue"
        label = f"{MODEL_NAMES[run['key'][1]]} {'w/' if run['key'][3] else 'w/o'} seg, seed {run['seed']}"
        for ax, column in zip(axes, panels):
            values = [float(r[column]) for r in log]
            ax.plot(iteration, values, color=color, alpha=0.15, lw=0.6)
            ax.plot(
                iteration,
                smoothed(values, max(10, len(log) // 50)),
                color=color,
                lw=2,
                ls=["-", "--", ":", "-."][run["seed"] % 4],
                label=label,
            )
    for ax, title in zip(axes, panels.values()):
        ax.set_xlabel("iteration")
        ax.set_title(title)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def roc_points(y_true, y_score, grid):
    """The ROC curve's true-positive rate at each false-positive rate of `grid` (the highest the curve reaches
    at that rate: a step curve) and the AUC (Mann-Whitney, ties counted 1/2)."""
    from sklearn.metrics import roc_curve  # the metric's reference implementation

    fpr, tpr, _ = roc_curve(y_true, y_score)
    tpr_at = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    return tpr_at, float(auc_columns(y_true[:, None].astype(float), y_score[:, None])[0])


def roc_figure(runs, path):
    """Each finding's ROC curve on the test split, one panel each: the arms (w/o seg blue, w/ seg red)
    overlaid, each run thin, the mean over an arm's runs (of the TPR at each FPR) bold; AUCs in the legend."""
    import matplotlib  # optional for everything else: imported where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, grid = runs[0]["classes"], np.linspace(0, 1, 201)
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes.flat, classes)):
        for seg, color in ((False, "tab:blue"), (True, "tab:red")):
            arm = [r for r in runs if r["key"][3] == seg and len(np.unique(r["y_true"][:, k])) == 2]
            curves = [roc_points(r["y_true"][:, k], r["y_prob"][:, k], grid) for r in arm]
            for tpr, _ in curves:
                ax.plot(grid, tpr, color=color, lw=0.6, alpha=0.4)
            if curves:
                aucs = [a for _, a in curves]
                label = f"{'w/' if seg else 'w/o'} seg: AUC {100 * np.mean(aucs):.1f} ({len(curves)} run(s))"
                ax.plot(grid, np.mean([t for t, _ in curves], 0), color=color, lw=2, label=label)
        ax.plot([0, 1], [0, 1], color="gray", lw=0.5, ls=":")
        ax.set(
            title=f"{ABBREVIATIONS.get(name, '')} {name}"[:40], xlabel="1 - specificity", ylabel="sensitivity"
        )
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(classes) :]:
        ax.axis("off")
    fig.tight_layout()
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_comparison(runs, stem, resamples, seed, heading):
    """Print the comparison under `heading` and write it to <stem>.txt and its records to <stem>.json."""
    text, records = comparison_report(runs, resamples, seed)
    text = heading + text
    print(text)
    with utils.atomic_path(f"{stem}.txt") as tmp, open(tmp, "w") as f:
        f.write(text + "\n")
    utils.write_json(f"{stem}.json", records)
    print(f"\nwrote {stem}.txt and {stem}.json")
