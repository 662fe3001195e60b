"""Calibrate the difficulty of the synthetic phantom's localised findings on baseline runs only (no --seg).

    python docs/study/calibrate.py   # the pre-registered ladder; stops at the first level meeting the rule

Each level sets synthetic.NODULES (nodule radius, decoy probability) and trains R3D-18 WITHOUT segmentation
supervision: seed 100 (not a seed of the study), the default 320 training phantoms, 200 validation phantoms
(the study's validation split is the first 80 of them), the level's epochs. The rule reads only the
validation AUCs; the test outputs are deleted unread. Results go to runs/study/calibration/calibration.csv.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train  # noqa: E402
from ctkit import synthetic, utils  # noqa: E402
from ctkit.labels import read_predictions  # noqa: E402

LOCALISED = ("nodule_right_upper_lobe", "nodule_left_lower_lobe")
GLOBAL = ("cardiomegaly", "pleural_effusion", "emphysema")
# fmt: off
LADDER = [  # hardest first; the first level meeting the rule is frozen into synthetic.NODULES
    ("A", dict(radius=(2.5, 4.0), decoy_probability=0.5), 6),  # the phantom before calibration
    ("B", dict(radius=(3.5, 5.0), decoy_probability=0.5), 6),
    ("C", dict(radius=(3.5, 5.0), decoy_probability=0.25), 6),
    ("D", dict(radius=(4.5, 6.0), decoy_probability=0.25), 6),
    ("E", dict(radius=(4.5, 6.0), decoy_probability=0.0), 6),
    ("B12", dict(radius=(3.5, 5.0), decoy_probability=0.5), 12),  # then a longer budget, same order
    ("C12", dict(radius=(3.5, 5.0), decoy_probability=0.25), 12),
    ("D12", dict(radius=(4.5, 6.0), decoy_probability=0.25), 12),
    ("E12", dict(radius=(4.5, 6.0), decoy_probability=0.0), 12),
]
# fmt: on
AUC_RANGE = (0.60, 0.85)  # each localised class: clearly above chance, far from perfect


def run_level(name, nodules, epochs, out):
    """Train the baseline at one level; {class: validation AUC}."""
    synthetic.NODULES = dict(nodules)
    folder = out / name
    if not (folder / "predictions_val.csv").exists():
        args = ["--seed", "100", "--synthetic-cases", "320", "200", "200", "--epochs", str(epochs)]
        train.cli([*args, "--output-dir", str(folder)])
    for unread in ("predictions_test.csv", "metrics_test.csv", "metrics_test.json"):
        (folder / unread).unlink(missing_ok=True)  # the rule never looks at the test split
    val = read_predictions(str(folder / "predictions_val.csv"))
    rows, _, _ = evaluate.compute_metrics(val["y_true"], val["y_prob"], val["classes"])
    return {r["class"]: r["auc"] for r in rows}


def meets_rule(aucs):
    return all(AUC_RANGE[0] <= aucs[c] <= AUC_RANGE[1] for c in LOCALISED)


def bisect(previous, level):
    """Midpoint between a level below the range and one above it (the rule allows two such steps)."""
    (_, a, ea), (name, b, eb) = previous, level
    radius = tuple((x + y) / 2 for x, y in zip(a["radius"], b["radius"]))
    decoy = (a["decoy_probability"] + b["decoy_probability"]) / 2
    return (f"{previous[0]}{name}", dict(radius=radius, decoy_probability=decoy), max(ea, eb))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study" / "calibration")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, previous, queue, bisections = [], None, list(LADDER), 0
    while queue:
        level = queue.pop(0)
        aucs = run_level(*level, args.out)
        ok = meets_rule(aucs)
        rows.append(
            [level[0], level[1]["radius"], level[1]["decoy_probability"], level[2], ok]
            + [f"{aucs[c]:.4f}" for c in LOCALISED + GLOBAL]
        )
        utils.write_csv(
            args.out / "calibration.csv",
            ["level", "radius", "decoy", "epochs", "meets_rule", *LOCALISED, *GLOBAL],
            rows,
        )
        print(
            f"level {level[0]}: {level[1]}, {level[2]} epochs -> validation AUC "
            + ", ".join(f"{c} {100 * aucs[c]:.1f}" for c in LOCALISED + GLOBAL)
            + f"; meets the rule: {ok}"
        )
        overshoot = all(aucs[c] > AUC_RANGE[1] for c in LOCALISED)
        below = previous is not None and any(previous[1][c] < AUC_RANGE[0] for c in LOCALISED)
        if ok:
            print(f"chosen: level {level[0]} = {level[1]}, {level[2]} epochs")
            return
        if overshoot and below and bisections < 2:
            bisections += 1
            queue.insert(0, bisect(previous[0], level))
            continue
        previous = (level, aucs)
    print("no level meets the rule: report this, do not run the comparison on an uncalibrated phantom")


if __name__ == "__main__":
    main()
