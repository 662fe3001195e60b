"""Train a 3D CT classifier, optionally with the auxiliary anatomy-segmentation loss (paper §2.2, §3.1, A.3).

    python train.py --seg                    # synthetic chest phantoms, R3D-18, ~8 min on 2 CPU cores
    python train.py --dataset radchest --data-path /data/RAD-ChestCT --model r3d --seg --amp

The objective (eq. 4, eq. 5 for RATIC) is model.Objective; without --seg there is no segmentation head.
AdamW (weight decay 1e-4), cosine learning rate per iteration, gradient-norm clipping at 5.0, and Table 4's
learning rate / batch size / epochs unless given: the command line is resolved once into `Settings`, printed
with where each value comes from and saved as config.json. Under torchrun every process takes a batch of -b
cases. The run folder gets config.json, iterations.csv, epochs.csv, checkpoint.pth (latest),
checkpoint_best.pth (best validation macro AUC), predictions, metrics and with --seg the seg head's Dice and
learning report, each written atomically. After a crash, rerun the same command with --resume: on CPU it ends
where an uninterrupted run would.
"""

import dataclasses
import functools
import math
import os
import re
import sys
import time

import torch

import data
import evaluate
from ctkit import ct_io, inference, labels, learning_report, mask_qc, precision, synthetic, utils
from ctkit.labels import by_patient, write_predictions
from ctkit.pretrained import load_pretrained
from ctkit.utils import BadInput, flag
from model import ARCHS, Objective, build_model, probabilities

# fmt: off
TABLE4_LR = {("chest", "r3d"): 1e-4, ("chest", "mvit"): 1e-4, ("chest", "swin"): 5e-5,
             ("abdomen", "r3d"): 1e-4, ("abdomen", "mvit"): 1e-5, ("abdomen", "swin"): 1e-5}
TABLE4_BATCH = {("chest", "r3d"): 10, ("chest", "swin"): 6, ("chest", "mvit"): 4,
                ("abdomen", "r3d"): 5, ("abdomen", "swin"): 2, ("abdomen", "mvit"): 2}
TABLE4_EPOCHS = {"ctrate": 20, "radchest": 100, "ratic": 100, "synthetic": 6, "custom": 100}  # last 2: ours
# fmt: on
EPOCH_FIELDS = ("epoch", "iteration", "split", "macro_auc", "seconds")
STALE = (
    "checkpoint_best.pth",
    "predictions_val.csv",
    "predictions_test.csv",
    "metrics_val.json",
    "metrics_test.json",
    "metrics_val.csv",
    "metrics_test.csv",
    "dice_val.json",
    "dice_test.json",
    "seg_report_val.json",
    "seg_report_test.json",
    "sharpness.json",
    "evidence_by_anatomy_test.json",
    "evidence_by_anatomy_test.csv",
)
RUN_FILES = ("config.json", "checkpoint.pth", "iterations.csv", "epochs.csv", *STALE)  # make a folder a run's


DATASETS = ("synthetic", "ctrate", "radchest", "ratic", "custom")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a run and its command-line flag, declared once (utils.flag); resolved once from the
    command line (resolve): Table 4's defaults filled in, the folders and the checkpoint to resume from
    decided. Saved as config.json and in every checkpoint; `resumed`: what a resumed run must share with its
    checkpoint, or its steps, crops, schedule or arithmetic would differ (the task holds the structures)."""

    dataset: str = flag("synthetic", choices=DATASETS, resumed=True)
    model: str = flag("r3d", choices=ARCHS, resumed=True)
    seg: bool = flag(False, "add the auxiliary segmentation head and loss", action="store_true", resumed=True)
    seg_weight: float = flag(1.0, "weight of the segmentation loss (paper: 1)", type=float, resumed=True)
    seg_chunk: int = flag(0, "seg loss N slices at a time: less memory", type=int)
    pretrained: str | None = flag(None, "Kinetics-400 weights", nargs="?", const="download", metavar="PATH")
    structures: str = flag(
        "paper", "seg classes: paper, all, or names in the stored scheme (a=b+c merges)", metavar="SPEC"
    )
    data_path: str | None = flag(None, "dataset root holding the label files")
    labels: str | None = flag(
        None, "--dataset custom: the labels CSV (case_id or path, findings 0/1)", resumed=True
    )
    region: str | None = flag(
        None, "--dataset custom: window, crop, structures", choices=("chest", "abdomen")
    )
    prep_dir: str | None = flag(None, "make_masks.py output (ct/, mask/); default <data-path>/prep")
    skip_missing: bool = flag(False, "skip (and list) labelled cases without files", action="store_true")
    val_fraction: float = flag(0.0, "hold out this fraction of patients", type=float, resumed=True)
    test_fraction: float | None = flag(
        None, "--dataset custom without a split column (default 0.2)", type=float, resumed=True
    )
    split_seed: int = flag(0, "seed of the RATIC patient split (drawn once)", type=int, resumed=True)
    output_dir: str = flag(None, "run folder (default runs/<dataset>_<model>[_seg][_pre]_s<seed>)")
    resume: str | None = flag(None, "no value: <output-dir>/checkpoint.pth if any", nargs="?", const="auto")
    overwrite: bool = flag(False, "a new run in a folder holding a run: delete it", action="store_true")
    test_only: bool = flag(False, "only evaluate the --resume checkpoint", action="store_true")
    batch_size: int = flag(
        None, "per process (default: Table 4)", names=("-b", "--batch-size"), type=int, resumed=True
    )
    workers: int = flag(min(8, (os.cpu_count() or 2) // 2), names=("-j", "--workers"), type=int)
    epochs: int = flag(None, "default: Table 4", type=int, resumed=True)
    lr: float = flag(None, "base learning rate (default: Table 4)", type=float, resumed=True)
    weight_decay: float = flag(1e-4, names=("--wd", "--weight-decay"), type=float, resumed=True)
    lr_warmup_epochs: float = flag(0.0, "linear warm-up before the cosine", type=float, resumed=True)
    clip_grad_norm: float = flag(5.0, "0: no clipping (still logged)", type=float)
    amp: bool = flag(
        False, "bf16 autocast (GPUs without bf16: fp16; CPU: checked)", action="store_true", resumed=True
    )
    channels_last: bool = flag(False, "channels-last 3D weights (faster convs)", action="store_true")
    seed: int = flag(0, type=int, resumed=True)
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu")
    print_freq: int = flag(10, "iterations between log lines", type=int)
    checkpoint_every: int = flag(0, "also checkpoint every N iterations", type=int)
    max_steps: int | None = flag(None, "stop each epoch after N steps (short runs)", type=int, resumed=True)
    crop: tuple | None = flag(
        None, "another crop (the pad scales)", type=int, nargs=3, metavar=("D", "H", "W")
    )
    pad: tuple | None = flag(None, "override the pad box", type=int, nargs=3, metavar=("D", "H", "W"))
    synthetic_cases: tuple | None = flag(
        None, type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), resumed=True
    )
    synthetic_variant: str = flag(
        "default",
        "fissures: phantoms whose nodule labels need each case's lobes",
        choices=synthetic.VARIANTS,
        resumed=True,
    )

    def source(self):
        """Where the cases come from (data.Source); a custom dataset's drawn split is kept with the run."""
        return data.Source.of_run(dataclasses.asdict(self), self.output_dir)


RESUME_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["resumed"])


def get_args_parser():
    return utils.args_parser(Settings, __doc__)


def resolve(args, region, device):
    """Settings from the parsed command line (never changed): Table 4's value for every setting not given, the
    default folders, --resume without a value -> the run folder's checkpoint if any. Returns (Settings, lines
    that say where lr, batch size and epochs come from)."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    if args.dataset != "synthetic" and not args.data_path:
        raise BadInput(f"--dataset {args.dataset} needs --data-path (the folder holding its label files)")
    if (args.dataset == "custom") != bool(args.labels):
        raise BadInput("--dataset custom needs --labels FILE.csv, and --labels needs --dataset custom")
    if args.test_only and args.resume in (None, "auto") and not args.output_dir:
        raise BadInput("--test-only evaluates a checkpoint: give it with --resume CHECKPOINT")
    for name in ("batch_size", "epochs", "max_steps", "print_freq", "synthetic_cases"):
        values = given[name] if isinstance(given[name], tuple) else (given[name],)
        if any(v is not None and v < 1 for v in values):
            raise BadInput(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: must be at least 1")
    notes, region_model = [], (region, args.model)
    for name, table, key in (
        ("lr", TABLE4_LR, region_model),
        ("batch_size", TABLE4_BATCH, region_model),
        ("epochs", TABLE4_EPOCHS, args.dataset),
    ):
        default = f"this project's {key} default" if key in ("synthetic", "custom") else "Table 4"
        source = default if given[name] is None else f"given; {default}: {table[key]}"
        given[name] = table[key] if given[name] is None else given[name]
        notes.append(f"{name} {given[name]} ({source})")
    output_dir = args.output_dir
    if output_dir is None and args.test_only:  # the predictions go beside the evaluated checkpoint
        output_dir = os.path.dirname(os.path.abspath(args.resume))
    if output_dir is None:
        suffix = ("_seg" if args.seg else "") + ("_pre" if args.pretrained else "")
        if args.seg and args.structures != "paper":  # runs of other structure sets do not share a folder
            suffix += "_" + re.sub(r"[^\w+=-]+", "-", args.structures)[:40]
        output_dir = os.path.join("runs", f"{args.dataset}_{args.model}{suffix}_s{args.seed}")
    resume, overwrite = args.resume, args.overwrite
    if resume == "auto":  # a requeued job reruns one command: resume if there is a checkpoint
        path = os.path.join(output_dir, "checkpoint.pth")
        resume = path if os.path.exists(path) else None
        results = [name for name in STALE if os.path.exists(os.path.join(output_dir, name))]
        overwrite = overwrite or (resume is None and not results)  # killed before its first checkpoint
    if args.test_only and not resume:
        raise BadInput(f"--test-only: no checkpoint to evaluate in {output_dir}")
    prep_dir = args.prep_dir or (os.path.join(args.data_path, "prep") if args.data_path else None)
    given.update(output_dir=output_dir, resume=resume, overwrite=overwrite, prep_dir=prep_dir, device=device)
    return Settings(**given), notes


def cosine_lr(iteration, total_iterations, base_lr, warmup_iterations=0):
    if iteration < warmup_iterations:
        return base_lr * (iteration + 1) / warmup_iterations
    progress = (iteration - warmup_iterations) / max(1, total_iterations - warmup_iterations)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(objective, optimizer, scaler, loader, task, s, epoch, steps, save):
    """One epoch, from step steps[0] of steps[1] per epoch; save(name, iteration) writes a checkpoint.
    objective: model.Objective (inside DistributedDataParallel under torchrun); s: the Settings."""
    objective.train()
    device, (first, per_epoch) = next(objective.parameters()).device, steps
    total = per_epoch * s.epochs
    log_path = os.path.join(s.output_dir, "iterations.csv")
    log = utils.StepLog(log_path, total, skip_inf_grad=scaler.is_enabled())
    backbone = list(getattr(objective, "module", objective).classifier.backbone.parameters())
    t_end = time.time()
    for i, batch in enumerate(loader, start=first):
        it, data_time = epoch * per_epoch + i, time.time() - t_end
        lr = cosine_lr(it, total, s.lr, int(s.lr_warmup_epochs * per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(utils.step_seed(s.seed, utils.get_rank(), it))  # a resume replays dropout
        ct = ct_io.normalize(batch["ct"].to(device, non_blocking=True), task.window)  # HU window -> [-1, 1]
        labels = batch["label"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True) if s.seg else None  # the only difference of --seg
        mask = loader.dataset.seg_classes(mask, batch["index"], check=False)  # -> the run's seg classes
        with torch.autocast(device.type, precision.amp_dtype(device), enabled=s.amp):
            loss, cls_loss, seg_loss = objective(ct, labels, mask)  # L = L_cls + seg_weight * L_seg
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients (the scaler only scales with fp16)
        backbone_norm = utils.grad_norm(backbone)  # the part both arms share: Figure 3 compares it
        grad_norm = utils.clip_grad_norm(objective.parameters(), s.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        values = torch.stack(
            [loss.detach(), cls_loss.detach(), seg_loss.detach().float(), grad_norm, backbone_norm]
        )
        log.add(values, epoch=epoch, iteration=it, lr=lr, data_time=data_time)
        last = i + 1 == per_epoch
        save_now = s.checkpoint_every and (it + 1) % s.checkpoint_every == 0 and not last
        if len(log.pending) == s.print_freq or last or save_now:
            log.flush()  # reads the values back from the device, and so do the mask checks
            loader.dataset.check_labels()
        if save_now:
            save("checkpoint.pth", it + 1)
        if last:
            break
        t_end = time.time()


def setup_model(s, task, device):
    """(classifier, optimizer, scaler, iteration, best validation AUC): new, from Kinetics-400 or --resume.
    The same seed gives both arms the same backbone and classifier weights (the seg head is built last)."""
    torch.manual_seed(s.seed)
    model = build_model(s.model, task, s.seg)
    if s.pretrained and not s.resume:
        report = load_pretrained(model.backbone, s.pretrained)
        if utils.get_rank() == 0:
            print("\n".join(report))
    model.to(device)
    if s.channels_last:  # the same model; oneDNN / cuDNN convolutions run faster in this layout
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp and precision.amp_dtype(device) == torch.float16)
    if not s.resume:
        return model, optimizer, scaler, 0, -math.inf
    settings = {key: getattr(s, key) for key in RESUME_SETTINGS}
    settings.update(world_size=utils.get_world_size(), task=task.to_dict())
    if s.test_only:  # evaluation only: any checkpoint of the same task (classes, structures, geometry)
        settings = {"task": task.to_dict()}
    checkpoint = utils.resume(s.resume, model, optimizer, scaler, settings, evaluate_only=s.test_only)
    if utils.get_rank() == 0:
        print(f"resumed from {s.resume} at iteration {checkpoint['iteration']}")
    return model, optimizer, scaler, checkpoint["iteration"], checkpoint["best_auc"]


def continues_its_run(s):
    """Whether the run folder is the folder of the checkpoint resumed or evaluated: it holds that run."""
    return bool(s.resume) and os.path.realpath(os.path.dirname(s.resume)) == os.path.realpath(s.output_dir)


def check_output_folder(s):
    """Before anything is written: a run never replaces another run's results without --overwrite (a
    checkpoint resumed or evaluated in its own folder continues that run), and the folder can be written."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(s.output_dir, name))]
    if found and not (continues_its_run(s) or s.overwrite):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise BadInput(
            f"{s.output_dir} holds a run ({shown}): continue it with --resume, start it anew with "
            "--overwrite (deletes its results), or give another --output-dir"
        )
    utils.check_writable_folder(s.output_dir, "--output-dir")


def prepare_folder(s, task, iteration):
    """The run's first writes, after every check: the folder, no temporary file of a killed writer; a run
    that does not continue the folder's own leaves no file of an earlier one (--overwrite), a resumed one
    drops the log rows written after its checkpoint; then config.json (not for --test-only)."""
    os.makedirs(s.output_dir, exist_ok=True)
    utils.remove_temporaries(s.output_dir, lambda stem: stem in {name.split(".")[0] for name in RUN_FILES})
    logs = {
        "iterations.csv": (utils.StepLog.FIELDS, lambda row: int(row["iteration"]) < iteration),
        "epochs.csv": (EPOCH_FIELDS, lambda row: int(row["iteration"]) <= iteration),
    }
    earlier = () if continues_its_run(s) else RUN_FILES  # a new run, or a checkpoint taken to a new folder
    # first: a kill never pairs new settings with old weights
    utils.prepare_folder(s.output_dir, {} if s.test_only else logs, earlier)
    if s.test_only:
        return
    config = {**dataclasses.asdict(s), "task": task.to_dict()}
    utils.write_json(os.path.join(s.output_dir, "config.json"), config)


def predict_split(model, loader, task, amp=False):
    """Class probabilities (N, K) of the deployed classifier: model(x), no segmentation head."""

    def fn(ct, batch):
        return probabilities(model(ct).float(), task)

    return inference.for_each_case(model, loader, task.window, amp, fn, torch.zeros(0, len(task.classes)))


def write_outputs(model, loaders, task, s, train_set):
    """Predictions (and with --seg the seg head's Dice and learning report) of every evaluation split, then
    their metrics tables. The report's floors come from train_set's masks; on phantoms the test split's also
    has the per-case bound (its cost is fine there)."""
    floors, path = None, functools.partial(os.path.join, s.output_dir)
    for name, loader in loaders.items():
        y_prob = predict_split(model, loader, task, s.amp)
        ce, counts = inference.seg_split(model, loader, task, s.amp) if s.seg else (None, None)
        if utils.get_rank() != 0:
            continue
        ds = loader.dataset
        write_predictions(
            path(f"predictions_{name}.csv"), ds.case_ids, ds.labels, y_prob, task.classes, ds.groups
        )
        if not s.seg:
            continue
        # did the auxiliary branch learn the anatomy? Dice on the centre crops, then beyond where organs
        # usually lie (ctkit/learning_report.py)
        utils.write_json(path(f"dice_{name}.json"), learning_report.dice_summary(counts, task.structures))
        grid, device = inference.head_grid(model, task.crop), next(model.parameters()).device
        if floors is None:
            train_masks = data.centre_masks(train_set, learning_report.MAX_TRAIN_MASKS)
            lungs = learning_report.lungs_of(task.structures)
            floors = learning_report.floors(train_masks, grid, len(task.structures) + 1, device, lungs)
        bound = s.dataset == "synthetic" and name == "test"
        masks, head = list(data.centre_masks(ds)), (float(ce.sum()), counts)
        report = learning_report.learning_report(head, floors, masks, grid, task.structures, bound, device)
        utils.write_json(path(f"seg_report_{name}.json"), report)
    if utils.get_rank() == 0:
        if "val" in loaders:  # its thresholds are the ones tools/predict.py applies to new cases
            evaluate.evaluate_predictions(path("predictions_val.csv"), quiet=True)
        evaluate.evaluate_predictions(path("predictions_test.csv"))


def validate(model, loaders, task, s, epoch, iteration, seconds):
    """Macro AUC on the validation split; without one the test split's is printed, for monitoring only."""
    name = "val" if "val" in loaders else "test"
    dataset = loaders[name].dataset
    y_prob = predict_split(model, loaders[name], task, s.amp)
    scores = dict(y_true=dataset.labels, y_prob=y_prob, patients=dataset.groups, classes=task.classes)
    if task.kind == "ratic":  # evaluated per patient, as the test split (labels.unit)
        scores = by_patient(scores)
    rows, macro, _ = evaluate.compute_metrics(scores["y_true"], scores["y_prob"], task.classes)
    if utils.get_rank() == 0:
        aucs = "  ".join(f"{r['class']} {100 * r['auc']:.1f}" for r in rows)
        print(f"epoch {epoch} done in {seconds:.0f}s: {name} macro AUC {100 * macro['auc']:.2f}  {aucs}")
        row = dict(epoch=epoch, iteration=iteration, split=name, macro_auc=f"{macro['auc']:.6f}")
        log = utils.CSVLog(os.path.join(s.output_dir, "epochs.csv"), EPOCH_FIELDS)
        log.append([{**row, "seconds": f"{seconds:.1f}"}])
    return macro["auc"] if name == "val" else -math.inf  # never select a checkpoint on the test set


def describe(s, task, splits, notes):
    """The lines that say what the run uses."""
    processes, seg = utils.get_world_size(), "with" if s.seg else "without"
    print(f"{s.dataset} / {s.model} / {seg} segmentation supervision -> {s.output_dir}")
    print("  " + "\n  ".join(notes))
    print(f"  crop {task.crop} (D, H, W), HU window {task.window}, {len(task.classes)} classes")
    if s.seg:
        shown = ", ".join(task.structures[:8]) + (", ..." if len(task.structures) > 8 else "")
        print(f"  structures ({s.structures}): {len(task.structures)} + background: {shown}")
    effective = f"{processes} process(es) x batch {s.batch_size} = {processes * s.batch_size}"
    print(f"  cases: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; effective batch: {effective}")
    if s.seg and s.data_path:  # make_masks.py's quality control of the masks this run reads
        print("  " + mask_qc.mask_report(s.prep_dir, [c for d in splits.values() for c in d.case_ids]))


def save_checkpoint(name, iteration, best_auc, model, optimizer, scaler, s, task, resumable=True):
    """Rank 0 writes one dict of tensors and plain types, the task under its own key. The best checkpoint
    keeps only the weights (a third of the size: AdamW's two moments are twice the model)."""
    if utils.get_rank() == 0:
        state = dict(model=model.state_dict(), args=dataclasses.asdict(s), task=task.to_dict())
        if resumable:
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        state.update(iteration=iteration, best_auc=best_auc, world_size=utils.get_world_size())
        utils.save_checkpoint(os.path.join(s.output_dir, name), state)


def prepare_run(s, notes, region, device):
    """(Task, {split: dataset}) of the resolved settings, checked and printed by rank 0; nothing is written
    yet but a custom dataset's drawn split (removed by main if the run stops before training)."""
    fault = s.amp and precision.bf16_fault(torch.device(device).type)
    if fault:  # before anything is written: a wrong bf16 gradient would train without a word
        raise BadInput(f"--amp: {fault}; train in fp32: leave out --amp")
    check_output_folder(s)
    try:
        classes = labels.custom_classes(s.labels) if s.dataset == "custom" else None
        anatomy = data.anatomy(s.structures, s.source(), region, with_mask=s.seg)
        task = data.make_task(s.dataset, s.crop, s.pad, region, classes, anatomy)
        splits = data.build_datasets(task, s.source(), s.seed, s.seg, anatomy.lut)
    except (OSError, BadInput) as error:
        raise BadInput(f"cannot build the {s.dataset} dataset: {error}") from None
    if utils.get_rank() == 0:
        describe(s, task, splits, notes)
    return task, splits


def fit(objective, state, training, loaders, task, s):
    """The epochs from the state's iteration on, validated and checkpointed after each; then the
    classifier holds the best-on-validation weights (with a validation split), ready to be tested.
    state: (classifier, optimizer, scaler, iteration, best AUC); training: (loader, steps per epoch)."""
    model, optimizer, scaler, iteration, best_auc = state
    train_loader, per_epoch = training

    def save(name, iteration, resumable=True):  # rank 0 writes; the best AUC as it is when saved
        save_checkpoint(name, iteration, best_auc, model, optimizer, scaler, s, task, resumable)

    (start_epoch, first_step), best_state = divmod(iteration, per_epoch), None
    for epoch in range(start_epoch, s.epochs):
        train_loader.sampler.set_epoch(epoch, skip=first_step)
        t0 = time.time()
        train_one_epoch(
            objective, optimizer, scaler, train_loader, task, s, epoch, (first_step, per_epoch), save
        )
        first_step, iteration = 0, (epoch + 1) * per_epoch
        auc = validate(model, loaders, task, s, epoch, iteration, time.time() - t0)
        if auc > best_auc:  # every process computed the same AUC: each keeps the best weights in memory
            best_auc, best_state = auc, utils.cpu_state(model)
            save("checkpoint_best.pth", iteration, resumable=False)
        save("checkpoint.pth", iteration)
    if "val" in loaders:  # with a validation split, test the best on it
        best_state = best_state or utils.saved_weights(os.path.join(s.output_dir, "checkpoint_best.pth"))
        if best_state is not None:
            model.load_state_dict(best_state)


def loaders_for(splits, s):
    """(training loader, {"val"/"test": evaluation loader}) of the splits there are."""
    options = dict(
        batch_size=s.batch_size, workers=s.workers, seed=s.seed, pin_memory=s.device.startswith("cuda")
    )
    evaluation = {k: data.make_loader(splits[k], False, **options) for k in ("val", "test") if k in splits}
    return data.make_loader(splits["train"], True, **options), evaluation


def main(args):
    rank, world_size, device = utils.init_distributed(args.device)
    region = data.region_of(args.dataset, args.region)
    s, notes = resolve(args, region, device)
    with utils.removed_on_failure(s.source().split_file):  # a split drawn by a run that stops here: removed
        task, splits = prepare_run(s, notes, region, device)
        try:
            model, optimizer, scaler, iteration, best_auc = setup_model(s, task, torch.device(device))
        except (OSError, ValueError, RuntimeError) as error:
            raise BadInput(f"cannot set up the model: {error}") from None
        train_loader, loaders = loaders_for(splits, s)
        per_epoch = min(len(train_loader), s.max_steps or len(train_loader))
        if per_epoch == 0:
            raise BadInput(
                f"the training set ({len(splits['train'])} cases) is smaller than a batch of {s.batch_size}"
            )
    objective = Objective(model, task.kind, s.seg_weight, s.seg_chunk)  # the loss; `model` is what is saved
    if world_size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, utils.device_ids(device))
    if rank == 0:
        prepare_folder(s, task, iteration)
    if not s.test_only:  # --test-only evaluates the checkpoint as it is
        state = (model, optimizer, scaler, iteration, best_auc)
        fit(objective, state, (train_loader, per_epoch), loaders, task, s)
    write_outputs(model, loaders, task, s, splits["train"])
    if world_size > 1:
        torch.distributed.destroy_process_group()


def cli(argv=None):
    """The command line: input the run cannot use (or a non-finite loss) ends in one line, exit status 1."""
    try:
        main(get_args_parser().parse_args(argv))
    except (utils.NonFiniteLoss, BadInput) as error:  # from a DataLoader worker too (utils.one_line)
        raise SystemExit("stopped: " + utils.one_line(error)) from None


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in a log file
    cli()
