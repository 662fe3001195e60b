"""The phantom study at a larger geometry: 64 x 96 x 96 (R3D-18 grid 4 x 6 x 6, docs/synthetic_study_grid4.md)
by default, 96 x 192 x 192 (grid 6 x 12 x 12, docs/synthetic_study_grid6.md) with --crop on a GPU.

    python docs/study/grid4.py check [--level D]           # baseline-only check: validation AUC only
    python docs/study/grid4.py run --seed S --arm base|seg  # one study run, then its localisation scores
    python docs/study/grid4.py report                      # the finished runs: tables, CIs, Figure 3, ...
    python docs/study/grid4.py --crop 96 192 192 --out runs/study96 check --level C   # (bench/gpu_run.sh)

Levels B-E are the default phantoms' nodule ladder; F and F12 are the fissures variant (the positive control,
docs/synthetic_study_fissures.md: --out runs/fissures64, every command with --level F).

Every command resumes: a run with a checkpoint continues (--resume), a finished run is not trained again, a
scored run is not scored again. Runs go to runs/study64/ (--out). --smoke: tiny runs (2 steps, 20/10/12
phantoms) that rehearse the commands on a CPU. Before a run trains, it prints the arithmetic (bf16 autocast,
or fp32 where this CPU's bf16 3D convolutions are wrong: ctkit/precision.py) and the measured seconds per
training step at the study's geometry, from which a protocol's step budget is sized.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import bench  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from ctkit import compare, ct_io, evidence, precision, synthetic, utils  # noqa: E402
from ctkit.ct_io import AIR_HU  # noqa: E402
from ctkit.labels import read_predictions  # noqa: E402
from model import build_model  # noqa: E402

OUT = ROOT / "runs" / "study64"  # --out
GEOMETRY = ["--crop", "64", "96", "96", "--amp", "--channels-last"]  # --crop replaces the size
SMOKE = []  # --smoke: appended to every train.py command line
LOCALISED = tuple(name for name, _ in synthetic.LOCALISED)
GLOBAL = ("cardiomegaly", "pleural_effusion", "emphysema")
LEVELS = {  # (phantom variant, its nodules, epochs); B-E: the first study's ladder (docs/study/calibrate.py)
    "B": ("default", dict(radius=(3.5, 5.0), decoy_probability=0.5), 6),
    "C": ("default", dict(radius=(3.5, 5.0), decoy_probability=0.25), 6),
    "D": ("default", dict(radius=(4.5, 6.0), decoy_probability=0.25), 6),  # the default phantom
    "E": ("default", dict(radius=(4.5, 6.0), decoy_probability=0.0), 6),
    "D12": ("default", dict(radius=(4.5, 6.0), decoy_probability=0.25), 12),
    "F": ("fissures", synthetic.FISSURES, 6),  # the positive control
    "F12": ("fissures", synthetic.FISSURES, 12),
}
AUC_RANGE = {"default": (0.60, 0.85), "fissures": (0.60, 0.90)}  # the checks' rules, per variant
STUDY_LEVEL = "C"  # the check's result (docs/synthetic_study_grid4.md §2), committed before any --seg run
ARMS, SEEDS = ("base", "seg"), (0, 1, 2)
SCORES = ("point_region", "point_finding", "share")  # evidence.localisation_scores; the region is the lobe


def arithmetic(smoke):
    """Drop --amp where bf16 does not train right on this machine (ctkit/precision.py), then print the seconds
    per training step of the seg arm (R3D-18, the study's crop and batch; batch 2 with --smoke)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fault = precision.bf16_fault(device)
    if fault and "--amp" in GEOMETRY:
        GEOMETRY.remove("--amp")
        print(f"the study trains in fp32: {fault}")
    crop, batch = tuple(int(v) for v in GEOMETRY[1:4]), 2 if smoke else train.TABLE4_BATCH[("chest", "r3d")]
    torch.manual_seed(0)
    net = build_model("r3d", data.make_task("synthetic", crop), seg=True)
    if "--channels-last" in GEOMETRY:
        net = net.to(memory_format=torch.channels_last_3d)
    seconds = batch / bench.step_stats(net, device, batch, crop, True, 1 if smoke else 3, amp=not fault)[0]
    name, settings = precision.device_name(device), " ".join(["fp32" if fault else "bf16", *GEOMETRY[4:]])
    print(f"{name}: {seconds:.2f} s per training step (r3d w/ seg, batch {batch}, crop {crop}, {settings})")


def train_run(folder, extra, level):
    """train.py with the study's geometry at a level (LEVELS); skipped if the run has finished (its last
    output, metrics_test.json, is written: a run stopped while writing its outputs writes them again)."""
    variant, nodules, epochs = LEVELS[level]
    if variant == "default":
        synthetic.NODULES = dict(nodules)
    if (folder / "metrics_test.json").exists():
        return
    arithmetic(smoke=bool(SMOKE))
    argv = [*GEOMETRY, *extra, "--synthetic-variant", variant, "--epochs", str(epochs)]
    argv += ["--output-dir", str(folder), "--resume", "--checkpoint-every", "8", *SMOKE]
    print("train.py " + " ".join(argv), flush=True)
    train.cli(argv)


def check(level):
    """The baseline-only check: seed 100, 200 validation phantoms; test outputs deleted unread."""
    folder = OUT / f"check_{level}"
    if not (folder / "check.csv").exists():
        train_run(folder, ["--seed", "100", "--synthetic-cases", "320", "200", "200"], level)
    for unread in ("predictions_test.csv", "metrics_test.csv", "metrics_test.json"):
        (folder / unread).unlink(missing_ok=True)  # the rule never looks at the test split
    val = read_predictions(str(folder / "predictions_val.csv"))
    rows, _, _ = evaluate.compute_metrics(val["y_true"], val["y_prob"], val["classes"])
    aucs = {r["class"]: r["auc"] for r in rows}
    variant, nodules, epochs = LEVELS[level]
    low, high = AUC_RANGE[variant]
    ok = all(low <= aucs[c] <= high for c in LOCALISED)
    header = ["level", "variant", "radius", "decoy", "epochs", "meets_rule", *LOCALISED, *GLOBAL]
    decoy = nodules.get("decoy_probability", nodules.get("decoy"))
    row = [level, variant, nodules["radius"], decoy, epochs, ok]
    utils.write_csv(folder / "check.csv", header, [row + [f"{aucs[c]:.4f}" for c in LOCALISED + GLOBAL]])
    print(f"level {level}: validation AUC " + ", ".join(f"{c} {100 * aucs[c]:.1f}" for c in aucs))
    print(f"both localised findings in [{low}, {high}]: {ok}")


def run(seed, arm, level=STUDY_LEVEL):
    """One study run (resumed if it has a checkpoint), then its localisation scores."""
    folder = OUT / f"{arm}_s{seed}"
    train_run(folder, ["--seed", str(seed), *(["--seg"] if arm == "seg" else [])], level)
    if not (folder / "localisation_cases.csv").exists():
        score_localisation(folder)


@torch.no_grad()
def score_localisation(folder):
    """Evidence maps of the evaluated (best-on-validation) checkpoint on the test phantoms, centre crops as
    evaluated: per localised finding and positive case, evidence.localisation_scores of its grid map against
    its lobe and its voxels. Checks that mean(evidence) + bias reproduces the run's predictions."""
    config = utils.read_json(folder / "config.json")
    task = data.Task.from_dict(config["task"])
    net = build_model(config["model"], task, config["seg"])
    net.load_state_dict(utils.saved_weights(str(folder / "checkpoint_best.pth")))
    device = torch.device(config["device"])
    net.to(device).eval()
    stored = read_predictions(str(folder / "predictions_test.csv"))
    rows, worst = [], 0.0
    n_test = len(stored["y_true"])
    test = synthetic.phantoms("test", n_test, pad=task.pad, variant=config["synthetic_variant"])
    for i, (ct, mask, labels, findings) in enumerate(test):
        starts = data.window_start(ct.shape, task.pad, task.crop)
        crop = [
            np.ascontiguousarray(data.read_window(v, starts, task.crop, fill))
            for v, fill in ((ct, AIR_HU), (mask, 0), (findings, 0))
        ]
        x = ct_io.normalize(torch.from_numpy(crop[0])[None, None].to(device), task.window)
        with torch.autocast(device.type, torch.bfloat16, enabled=config["amp"]):
            maps = evidence.evidence_maps(net, x)  # (1, K, d, h, w)
        logits = maps.mean((2, 3, 4))[0] + net.head.bias.float()
        worst = max(worst, float((torch.sigmoid(logits) - torch.as_tensor(stored["y_prob"][i])).abs().max()))
        grid = maps[0].float().cpu().numpy()  # (K, d, h, w)
        for k, (name, lobe) in enumerate(synthetic.LOCALISED):
            if labels[k]:
                region, finding = crop[1] == lobe, crop[2] == k + 1
                scores = evidence.localisation_scores(grid[task.classes.index(name)], region, finding)
                rows.append([f"synthetic_test_{i:04d}", name, *(scores[m] for m in SCORES)])
    if worst > 0.02:  # bf16 rounding is far below this; more means other cases or another model
        raise RuntimeError(
            f"{folder}: evidence maps do not reproduce predictions_test.csv (off by {worst:.3f})"
        )
    utils.write_csv(folder / "localisation_cases.csv", ["case_id", "class", *SCORES], rows)
    print(f"{folder}: {len(rows)} positive cases scored (probabilities reproduced to {worst:.1e})")


def finished_seeds():
    """The seeds whose runs of both arms are scored (a time-limited device run may finish only some)."""
    return [s for s in SEEDS if all((OUT / f"{a}_s{s}" / "localisation_cases.csv").exists() for a in ARMS)]


def same_cases(name, runs):
    """Every run's rows are the same cases in the same order (the bootstraps pair them by row)."""
    first, *others = runs
    if any(cases != first for cases in others):
        raise SystemExit(f"{OUT}: the runs' {name} do not list the same cases in the same order")


def localisation_table(seeds, resamples=2000, seed=0):
    """Per localised finding and score: mean over seeds per arm, Δ (seg - base), paired case bootstrap."""
    per_arm = {}  # arm -> the rows of each seed's localisation_cases.csv (the same cases in the same order)
    for arm in ARMS:
        per_arm[arm] = []
        for s in seeds:
            with open(OUT / f"{arm}_s{s}" / "localisation_cases.csv", newline="") as f:
                per_arm[arm].append(list(csv.DictReader(f)))
    tables = [t for arm in ARMS for t in per_arm[arm]]
    same_cases("localisation_cases.csv", [[(r["case_id"], r["class"]) for r in t] for t in tables])
    lines, records, rng = [], [], np.random.default_rng(seed)
    header = f"{'finding':<26}{'score':<15}{'w/o seg':>9}{'w/ seg':>9}{'delta':>9}  95% CI (cases)   cases"
    lines += [header, "-" * len(header)]
    for name, _ in synthetic.LOCALISED:
        for score in SCORES:
            arms = {}
            for arm, tables in per_arm.items():  # (seeds, cases) of this finding and score
                arms[arm] = np.array([[float(r[score]) for r in t if r["class"] == name] for t in tables])
            keep = ~np.isnan(arms["base"]).any(0) & ~np.isnan(arms["seg"]).any(0)
            base, seg = arms["base"][:, keep].mean(0), arms["seg"][:, keep].mean(0)  # per case, over seeds
            delta = seg - base
            boot = [delta[rng.integers(0, len(delta), len(delta))].mean() for _ in range(resamples)]
            low, high = np.percentile(boot, [2.5, 97.5])
            lines.append(
                f"{name:<26}{score:<15}{base.mean():9.3f}{seg.mean():9.3f}{delta.mean():+9.3f}  "
                f"[{low:+.3f}, {high:+.3f}]  {int(keep.sum()):>5}"
            )
            records.append(
                dict(
                    finding=name,
                    score=score,
                    base=base.mean(),
                    seg=seg.mean(),
                    delta=delta.mean(),
                    ci=[low, high],
                    cases=int(keep.sum()),
                    per_seed={a: arms[a][:, keep].mean(1).tolist() for a in ARMS},
                )
            )
    return "\n".join(lines), records


def seed_interval(deltas):
    """The 95 % t-interval of the mean of per-seed paired differences (nan for one seed)."""
    n = len(deltas)
    half = stats.t.ppf(0.975, n - 1) * np.std(deltas, ddof=1) / np.sqrt(n) if n > 1 else np.nan
    return np.mean(deltas) - half, np.mean(deltas) + half


def endpoint_table(seeds, resamples=2000, seed=0):
    """The primary endpoint of the positive control (docs/synthetic_study_fissures.md §2), per localised
    finding and for the macro AUC: Δ = mean AUC w/ seg - w/o seg over the seeds; the paired case bootstrap;
    the two-level bootstrap (seeds, then cases); the per-seed paired differences (same seed, same initial
    backbone), their 95 % t-interval and how many are positive."""
    runs = {
        (a, s): read_predictions(str(OUT / f"{a}_s{s}" / "predictions_test.csv")) for a in ARMS for s in seeds
    }
    same_cases(
        "predictions_test.csv", [(r["cases"], r["y_true"].tolist(), r["classes"]) for r in runs.values()]
    )
    y, classes = runs[ARMS[0], seeds[0]]["y_true"], runs[ARMS[0], seeds[0]]["classes"]
    lines = [f"{'AUC':<26}{'Δ':>7}  {'CI, cases; p':<31}{'CI, two-level; p':<31}per-seed Δ; t-interval"]
    records = []
    for name in (*LOCALISED, "macro"):
        cols = list(range(len(classes))) if name == "macro" else [classes.index(name)]
        seg, base = ([runs[a, s]["y_prob"][:, cols] for s in seeds] for a in ("seg", "base"))
        delta, low, high, p = compare.paired_bootstrap(y[:, cols], seg, base, resamples, seed)
        _, low2, high2, p2 = compare.paired_bootstrap(y[:, cols], seg, base, resamples, seed, seeds_too=True)
        truth = y[:, cols]
        per_seed = [
            compare.mean_macro_auc(truth, [g]) - compare.mean_macro_auc(truth, [b]) for g, b in zip(seg, base)
        ]
        interval = seed_interval(per_seed)
        positive = f"{sum(d > 0 for d in per_seed)}/{len(seeds)} > 0"
        each = ", ".join(f"{100 * d:+.2f}" for d in per_seed)
        by_cases, two_level = (
            f"{compare.ci(lo, hi)}; {compare.p_text(pv, resamples)}"
            for lo, hi, pv in ((low, high, p), (low2, high2, p2))
        )
        cells = f"{100 * delta:+7.2f}  {by_cases:<31}{two_level:<31}"
        lines.append(f"{name:<26}{cells}{each} ({positive}); {compare.ci(*interval)}")
        record = dict(endpoint=name, delta=delta, ci_cases=[low, high], p_cases=p, per_seed=per_seed)
        records.append(dict(record, ci_two_level=[low2, high2], p_two_level=p2, t_interval=list(interval)))
    return "\n".join(lines), records


def learning_table(seeds):
    """The learning report of every seg run (test split): CE, mean Dice and the lobes' mean Dice (did the head
    learn the lobes, not only the heart and the lungs' outline?) per row, and their seed means."""
    reports = [utils.read_json(OUT / f"seg_s{s}" / "seg_report_test.json") for s in seeds]
    lines = [f"{'':<42}" + "".join(f"{'seed ' + str(s):>24}" for s in seeds) + f"{'mean':>24}"]
    for row in reports[0]["rows"]:
        dice = [r["rows"][row]["dice"] for r in reports]
        lobes = [np.mean([d[name] for name in d if name.startswith("lung_")]) for d in dice]
        values = np.array([[r["rows"][row]["ce"] for r in reports], [d["mean"] for d in dice], lobes])
        cells = [f"{c:7.3f} / {d:.3f} / {lobe:.3f}" for c, d, lobe in zip(*np.c_[values, values.mean(1)])]
        lines.append(f"{row:<42}" + "".join(f"{c:>24}" for c in cells))
    grid = "x".join(map(str, reports[0]["grid"]))
    title = f"learning report (test, CE / mean Dice / the lobes' mean Dice; head grid {grid})"
    return title + "\n" + "\n".join(lines), reports


def report():
    seeds = finished_seeds()
    if not seeds:
        raise SystemExit(f"{OUT}: no seed has finished runs of both arms yet")
    folders = [str(OUT / f"{arm}_s{s}") for arm in ARMS for s in seeds]
    argv = [*folders, "--figure", str(OUT / "figure3.png"), "--output", str(OUT / "comparison")]
    evaluate.main(evaluate.get_args_parser().parse_args(argv))
    endpoints, end_records = endpoint_table(seeds)
    text, records = learning_table(seeds)
    text = f"primary endpoint: Δ AUC w/ seg - w/o seg, test, seeds {list(seeds)}\n{endpoints}\n\n{text}"
    localisation, loc_records = localisation_table(seeds)
    text += (
        "\n\nlocalisation (test phantoms positive for the finding; evidence of the evaluated checkpoint)\n"
    )
    text += localisation
    print("\n" + text)
    with utils.atomic_path(str(OUT / "report.txt")) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")
    utils.write_json(
        str(OUT / "report.json"), dict(endpoints=end_records, learning=records, localisation=loc_records)
    )


def main():
    global OUT, GEOMETRY, SMOKE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--crop", type=int, nargs=3, default=(64, 96, 96), metavar=("D", "H", "W"))
    parser.add_argument("--out", type=Path, default=OUT, help="the study's run folders")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: rehearse the commands on a CPU")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check").add_argument("--level", default="D", choices=sorted(LEVELS))
    one = commands.add_parser("run")
    one.add_argument("--seed", type=int, required=True, choices=SEEDS)
    one.add_argument("--arm", required=True, choices=ARMS)
    one.add_argument("--level", default=STUDY_LEVEL, choices=sorted(LEVELS))
    commands.add_parser("report")
    args = parser.parse_args()
    OUT, GEOMETRY = args.out, ["--crop", *map(str, args.crop), *GEOMETRY[4:]]
    SMOKE = "--synthetic-cases 20 10 12 --max-steps 2 --epochs 1 -b 2 -j 0".split() if args.smoke else []
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "check":
        check(args.level)
    elif args.command == "run":
        run(args.seed, args.arm, args.level)
    else:
        report()


if __name__ == "__main__":
    main()
