"""The study at 64 x 96 x 96 (R3D-18 grid 4 x 6 x 6), docs/synthetic_study_grid4.md.

    python docs/study/grid4.py check [--level D]           # baseline-only check: validation AUC only
    python docs/study/grid4.py run --seed S --arm base|seg  # one study run, then its localisation scores
    python docs/study/grid4.py report                      # the six runs: tables, CIs, Figure 3, localisation

Every command resumes: a run with a checkpoint continues (--resume), a finished run is not trained again, a
scored run is not scored again. Runs go to runs/study64/.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

OUT = ROOT / "runs" / "study64"
GEOMETRY = ["--crop", "64", "96", "96", "--amp", "--channels-last"]
LOCALISED = tuple(name for name, _ in synthetic.LOCALISED)
GLOBAL = ("cardiomegaly", "pleural_effusion", "emphysema")
LEVELS = {  # the first study's ladder (docs/study/calibrate.py); D is the default phantom
    "B": (dict(radius=(3.5, 5.0), decoy_probability=0.5), 6),
    "C": (dict(radius=(3.5, 5.0), decoy_probability=0.25), 6),
    "D": (dict(radius=(4.5, 6.0), decoy_probability=0.25), 6),
    "E": (dict(radius=(4.5, 6.0), decoy_probability=0.0), 6),
    "D12": (dict(radius=(4.5, 6.0), decoy_probability=0.25), 12),
}
AUC_RANGE = (0.60, 0.85)
STUDY_LEVEL = "D"  # the level the study runs at (the check's result decides; committed before any --seg run)


def train_run(folder, extra, level):
    """train.py with the study's geometry at a level of the ladder; skipped if the run has finished."""
    nodules, epochs = LEVELS[level]
    synthetic.NODULES = dict(nodules)
    if (folder / "predictions_test.csv").exists():
        return
    argv = [*GEOMETRY, *extra, "--epochs", str(epochs), "--output-dir", str(folder), "--resume"]
    print("train.py " + " ".join(argv), flush=True)
    train.main(train.get_args_parser().parse_args(argv))


def check(level):
    """The baseline-only check: seed 100, 200 validation phantoms; test outputs deleted unread."""
    folder = OUT / f"check_{level}"
    train_run(folder, ["--seed", "100", "--synthetic-cases", "320", "200", "200"], level)
    for unread in ("predictions_test.csv", "metrics_test.csv", "metrics_test.json"):
        (folder / unread).unlink(missing_ok=True)  # the rule never looks at the test split
    val = evaluate.read_predictions(str(folder / "predictions_val.csv"))
    rows, _, _ = evaluate.compute_metrics(val["y_true"], val["y_prob"], val["classes"])
    aucs = {r["class"]: r["auc"] for r in rows}
    ok = all(AUC_RANGE[0] <= aucs[c] <= AUC_RANGE[1] for c in LOCALISED)
    header = ["level", "radius", "decoy", "epochs", "meets_rule", *LOCALISED, *GLOBAL]
    nodules, epochs = LEVELS[level]
    row = [level, nodules["radius"], nodules["decoy_probability"], epochs, ok]
    utils.write_csv(folder / "check.csv", header, [row + [f"{aucs[c]:.4f}" for c in LOCALISED + GLOBAL]])
    print(f"level {level}: validation AUC " + ", ".join(f"{c} {100 * aucs[c]:.1f}" for c in aucs))
    print(f"both localised findings in [{AUC_RANGE[0]}, {AUC_RANGE[1]}]: {ok}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check").add_argument("--level", default="D", choices=sorted(LEVELS))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "check":
        check(args.level)


if __name__ == "__main__":
    main()
