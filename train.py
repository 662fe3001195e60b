"""Train a 3D CT classifier, optionally with the auxiliary anatomy-segmentation loss (paper §2.2, §3.1, A.3).

    python train.py --seg                    # synthetic chest phantoms, R3D-18, ~7 min on 2 CPU cores
    python train.py --dataset radchest --data-path /data/RAD-ChestCT --model r3d --seg --amp

The objective (eq. 4, eq. 5 for RATIC) is model.compute_loss; without --seg there is no segmentation head.
AdamW (weight decay 1e-4), cosine learning rate per iteration, gradient-norm clipping at 5.0, and Table 4's
learning rate / batch size / epochs unless given. Under torchrun every process takes a batch of -b cases.
The run folder gets config.json, iterations.csv, epochs.csv, checkpoint.pth (latest), checkpoint_best.pth
(best validation macro AUC), predictions, metrics and with --seg the seg head's Dice, each written atomically.
After a crash, rerun the same command with --resume: on CPU it ends where an uninterrupted run would.
"""

import argparse
import functools
import math
import os
import re
import sys
import time

import torch

import data
import evaluate
import mask_qc
import utils
from labels import by_patient
from model import ARCHS, build_model, compute_loss
from pretrained import load_pretrained

# fmt: off
TABLE4_LR = {("chest", "r3d"): 1e-4, ("chest", "mvit"): 1e-4, ("chest", "swin"): 5e-5,
             ("abdomen", "r3d"): 1e-4, ("abdomen", "mvit"): 1e-5, ("abdomen", "swin"): 1e-5}
TABLE4_BATCH = {("chest", "r3d"): 10, ("chest", "swin"): 6, ("chest", "mvit"): 4,
                ("abdomen", "r3d"): 5, ("abdomen", "swin"): 2, ("abdomen", "mvit"): 2}
TABLE4_EPOCHS = {"ctrate": 20, "radchest": 100, "ratic": 100, "synthetic": 6}  # synthetic: ours
# fmt: on
ITERATION_FIELDS = ("epoch", "iteration", "loss", "cls_loss", "seg_loss", "grad_norm", "lr", "data_time")
EPOCH_FIELDS = ("epoch", "iteration", "split", "macro_auc", "seconds")
# what a resumed run must share with its checkpoint, or its steps, crops and schedule would not line up
# fmt: off
RESUME_SETTINGS = ("dataset", "model", "seg", "seg_weight", "batch_size", "seed", "epochs", "max_steps", "lr",
                   "lr_warmup_epochs", "weight_decay", "val_fraction", "split_seed", "synthetic_cases")
STALE = ("checkpoint_best.pth", "predictions_val.csv", "predictions_test.csv", "metrics_val.json",
         "metrics_test.json", "metrics_val.csv", "metrics_test.csv", "dice_val.json", "dice_test.json",
         "seg_report_val.json", "seg_report_test.json", "sharpness.json")
# fmt: on


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "ctrate", "radchest", "ratic"))
    p.add_argument("--model", default="r3d", choices=ARCHS)
    p.add_argument("--seg", action="store_true", help="add the auxiliary segmentation head and loss")
    p.add_argument("--seg-weight", default=1.0, type=float, help="weight of the segmentation loss (paper: 1)")
    p.add_argument("--seg-chunk", default=0, type=int, help="seg loss N slices at a time: less memory")
    p.add_argument("--pretrained", nargs="?", const="download", metavar="PATH", help="Kinetics-400 weights")
    p.add_argument("--data-path", help="dataset root holding the label files")
    p.add_argument("--prep-dir", help="make_masks.py output (ct/, mask/); default <data-path>/prep")
    p.add_argument("--skip-missing", action="store_true", help="skip (and list) labelled cases without files")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of patients")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the RATIC patient split (drawn once)")
    p.add_argument("--output-dir", help="run folder (default runs/<dataset>_<model>[_seg][_pre]_s<seed>)")
    p.add_argument("--resume", nargs="?", const="auto", help="no value: <output-dir>/checkpoint.pth if any")
    p.add_argument("--test-only", action="store_true", help="only evaluate the --resume checkpoint")
    p.add_argument("-b", "--batch-size", type=int, help="per process (default: Table 4)")
    p.add_argument("-j", "--workers", type=int, default=min(8, (os.cpu_count() or 2) // 2))
    p.add_argument("--epochs", type=int, help="default: Table 4")
    p.add_argument("--lr", type=float, help="base learning rate (default: Table 4)")
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    p.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine")
    p.add_argument("--clip-grad-norm", type=float, default=5.0, help="0: no clipping (still logged)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 + loss scaling without bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D weights (faster convs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--print-freq", type=int, default=10, help="iterations between log lines")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N iterations")
    p.add_argument("--max-steps", type=int, help="stop each epoch after N steps (short runs)")
    p.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"), help="another crop (the pad scales)")
    p.add_argument("--pad", type=int, nargs=3, metavar=("D", "H", "W"), help="override the pad box")
    p.add_argument("--synthetic-cases", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    return p


def fill_defaults(args, task):
    """Table 4's value for every setting not given; returns lines that say which is which."""
    notes = []
    region_model = (task.region, args.model)
    for name, table, key in (
        ("lr", TABLE4_LR, region_model),
        ("batch_size", TABLE4_BATCH, region_model),
        ("epochs", TABLE4_EPOCHS, args.dataset),
    ):
        given = getattr(args, name)
        setattr(args, name, table[key] if given is None else given)
        default = "this project's synthetic default" if key == "synthetic" else "Table 4"
        source = default if given is None else f"given; {default}: {table[key]}"
        notes.append(f"{name} {getattr(args, name)} ({source})")
    if args.output_dir is None:
        suffix = ("_seg" if args.seg else "") + ("_pre" if args.pretrained else "")
        args.output_dir = os.path.join("runs", f"{args.dataset}_{args.model}{suffix}_s{args.seed}")
    return notes


def cosine_lr(iteration, total_iterations, base_lr, warmup_iterations=0):
    if iteration < warmup_iterations:
        return base_lr * (iteration + 1) / warmup_iterations
    progress = (iteration - warmup_iterations) / max(1, total_iterations - warmup_iterations)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(model, optimizer, scaler, loader, task, args, epoch, steps, save):
    """One epoch, from step steps[0] of steps[1] per epoch; save(iteration) writes a mid-epoch checkpoint."""
    model.train()
    device, (first, per_epoch) = next(model.parameters()).device, steps
    log_path = os.path.join(args.output_dir, "iterations.csv")
    total = per_epoch * args.epochs
    log = utils.StepLog(log_path, ITERATION_FIELDS, total, skip_inf_grad=scaler.is_enabled())
    t_end = time.time()
    for i, batch in enumerate(loader, start=first):
        it, data_time = epoch * per_epoch + i, time.time() - t_end
        lr = cosine_lr(it, total, args.lr, int(args.lr_warmup_epochs * per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(utils.step_seed(args.seed, utils.get_rank(), it))  # a resume replays dropout
        ct = data.normalize(batch["ct"].to(device, non_blocking=True), task.window)  # HU window -> [-1, 1]
        labels = batch["label"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True) if args.seg else None
        with torch.autocast(device.type, utils.amp_dtype(device), enabled=args.amp):
            loss, cls_loss, seg_loss = compute_loss(model, ct, labels, task.kind, mask, args.seg_weight)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients (the scaler only scales with fp16)
        grad_norm = utils.clip_grad_norm(model.parameters(), args.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        values = torch.stack([loss.detach(), cls_loss.detach(), seg_loss.detach().float(), grad_norm])
        log.add(values, epoch=epoch, iteration=it, lr=lr, data_time=data_time)
        last = i + 1 == per_epoch
        save_now = args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and not last
        if len(log.pending) == args.print_freq or last or save_now:
            log.flush()
        if save_now:
            save(it + 1)
        if last:
            break
        t_end = time.time()


def setup_model(args, task, device):
    """(model, optimizer, scaler, iteration, best validation AUC): new, from Kinetics-400 or from --resume."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, task, args.seg, args.seg_chunk)
    if args.pretrained and not args.resume:
        report = load_pretrained(model.backbone, args.pretrained)
        if utils.get_rank() == 0:
            print("\n".join(report))
    model.to(device)
    if args.channels_last:  # the same model; oneDNN / cuDNN convolutions run faster in this layout
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and utils.amp_dtype(device) == torch.float16)
    if not args.resume:
        return model, optimizer, scaler, 0, -math.inf
    settings = {key: getattr(args, key) for key in RESUME_SETTINGS}
    settings.update(world_size=utils.get_world_size(), task=task.to_dict())
    settings = None if args.test_only else settings  # evaluation only: any checkpoint of the task will do
    checkpoint = utils.resume(args.resume, model, optimizer, scaler, settings)
    if utils.get_rank() == 0:
        print(f"resumed from {args.resume} at iteration {checkpoint['iteration']}")
    return model, optimizer, scaler, checkpoint["iteration"], checkpoint["best_auc"]


def prepare_folder(args, iteration):
    """A new run starts new logs and leaves no output of an earlier run; a resumed one drops the log rows
    written after its checkpoint."""
    logs = {"iterations.csv": (ITERATION_FIELDS, lambda row: int(row["iteration"]) < iteration),
            "epochs.csv": (EPOCH_FIELDS, lambda row: int(row["iteration"]) <= iteration)}  # fmt: skip
    utils.prepare_folder(args.output_dir, logs, (*logs, *STALE) if iteration == 0 else ())


def validate(model, loaders, task, args, epoch, iteration, seconds):
    """Macro AUC on the validation split; without one the test split's is printed, for monitoring only."""
    name = "val" if "val" in loaders else "test"
    dataset = loaders[name].dataset
    y_prob = evaluate.predict_split(utils.unwrap(model), loaders[name], task, args.amp)
    scores = dict(y_true=dataset.labels, y_prob=y_prob, patients=dataset.groups, classes=task.classes)
    if task.kind == "ratic":  # evaluated per patient, as the test split (evaluate.unit)
        scores = by_patient(scores)
    rows, macro, _ = evaluate.compute_metrics(scores["y_true"], scores["y_prob"], task.classes)
    if utils.get_rank() == 0:
        aucs = "  ".join(f"{r['class']} {100 * r['auc']:.1f}" for r in rows)
        print(f"epoch {epoch} done in {seconds:.0f}s: {name} macro AUC {100 * macro['auc']:.2f}  {aucs}")
        row = dict(epoch=epoch, iteration=iteration, split=name, macro_auc=f"{macro['auc']:.6f}")
        log = utils.CSVLog(os.path.join(args.output_dir, "epochs.csv"), EPOCH_FIELDS)
        log.append([{**row, "seconds": f"{seconds:.1f}"}])
    return macro["auc"] if name == "val" else -math.inf  # never select a checkpoint on the test set


def prepare_run(args):
    """Datasets, the task and Table 4's defaults; rank 0 writes config.json and prints what the run uses."""
    if args.dataset != "synthetic" and not args.data_path:
        sys.exit(f"--dataset {args.dataset} needs --data-path (the folder holding its label files)")
    if args.test_only and args.resume in (None, "auto") and not args.output_dir:
        sys.exit("--test-only evaluates a checkpoint: give it with --resume CHECKPOINT")
    if args.test_only and args.output_dir is None:  # the predictions go beside the evaluated checkpoint
        args.output_dir = os.path.dirname(os.path.abspath(args.resume))
    args.prep_dir = args.prep_dir or (os.path.join(args.data_path, "prep") if args.data_path else None)
    try:
        splits, task = data.build_datasets(args)
    except (OSError, utils.BadInput) as error:
        sys.exit(f"cannot build the {args.dataset} dataset: {error}")
    notes = fill_defaults(args, task)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.resume == "auto":  # a requeued job reruns one command: resume if there is a checkpoint
        path = os.path.join(args.output_dir, "checkpoint.pth")
        args.resume = path if os.path.exists(path) else None
    if args.test_only and not args.resume:
        sys.exit(f"--test-only: no checkpoint to evaluate in {args.output_dir}")
    if utils.get_rank() == 0:
        describe(args, task, splits, notes)
    return splits, task


def describe(args, task, splits, notes):
    """config.json (not for --test-only: the run's own stays) and the lines that say what the run uses."""
    if not args.test_only:
        utils.write_json(os.path.join(args.output_dir, "config.json"), {**vars(args), "task": task.to_dict()})
    processes, seg = utils.get_world_size(), "with" if args.seg else "without"
    print(f"{args.dataset} / {args.model} / {seg} segmentation supervision -> {args.output_dir}")
    print("  " + "\n  ".join(notes))
    print(f"  crop {task.crop} (D, H, W), HU window {task.window}, {len(task.classes)} classes")
    effective = f"{processes} process(es) x batch {args.batch_size} = {processes * args.batch_size}"
    print(f"  cases: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; effective batch: {effective}")
    if args.seg and args.data_path:  # make_masks.py's quality control of the masks this run reads
        print("  " + mask_qc.mask_report(args.prep_dir, [c for s in splits.values() for c in s.case_ids]))


def save_checkpoint(name, iteration, best_auc, model, optimizer, scaler, args, task, resumable=True):
    """Rank 0 writes one dict of tensors and plain types, the task under its own key. The best checkpoint
    keeps only the weights (a third of the size: AdamW's two moments are twice the model)."""
    if utils.get_rank() == 0:
        state = dict(model=utils.unwrap(model).state_dict(), args=vars(args), task=task.to_dict())
        if resumable:
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        state.update(iteration=iteration, best_auc=best_auc, world_size=utils.get_world_size())
        utils.save_checkpoint(os.path.join(args.output_dir, name), state)


def main(args):
    rank, world_size, args.device = utils.init_distributed(args.device)
    splits, task = prepare_run(args)
    try:
        model, optimizer, scaler, iteration, best_auc = setup_model(args, task, torch.device(args.device))
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"cannot set up the model: {error}")
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, utils.device_ids(args.device))
    train_loader, loaders = data.make_loaders(splits, args)
    per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    if per_epoch == 0:
        sys.exit(
            f"the training set ({len(splits['train'])} cases) is smaller than a batch of {args.batch_size}"
        )
    if rank == 0 and not args.test_only:
        prepare_folder(args, iteration)
    save = functools.partial(
        save_checkpoint, model=model, optimizer=optimizer, scaler=scaler, args=args, task=task
    )
    mid_epoch = lambda iteration: save("checkpoint.pth", iteration, best_auc)  # noqa: E731
    (start_epoch, first_step), best_state = divmod(iteration, per_epoch), None
    for epoch in range(start_epoch, start_epoch if args.test_only else args.epochs):
        train_loader.sampler.set_epoch(epoch, skip=first_step)
        t0 = time.time()
        steps = (first_step, per_epoch)
        train_one_epoch(model, optimizer, scaler, train_loader, task, args, epoch, steps, mid_epoch)
        first_step, iteration = 0, (epoch + 1) * per_epoch
        auc = validate(model, loaders, task, args, epoch, iteration, time.time() - t0)
        if auc > best_auc:  # every process computed the same AUC: each keeps the best weights in memory
            best_auc, best_state = auc, utils.cpu_state(model)
            save("checkpoint_best.pth", iteration, best_auc, resumable=False)
        save("checkpoint.pth", iteration, best_auc)
    if "val" in loaders and not args.test_only:  # with a validation split, test the best on it
        best_state = best_state or utils.saved_weights(os.path.join(args.output_dir, "checkpoint_best.pth"))
        if best_state is not None:
            utils.unwrap(model).load_state_dict(best_state)
    bound = args.dataset == "synthetic"  # the per-case bound of the learning report: phantoms only (cost)
    outputs = dict(seg=args.seg, amp=args.amp, train_set=splits["train"], bound=bound)
    evaluate.write_outputs(utils.unwrap(model), loaders, task, args.output_dir, **outputs)
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in a log file
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (utils.NonFiniteLoss, utils.BadInput) as error:  # from a DataLoader worker, it ends the traceback
        last_line = str(error).strip().splitlines()[-1]
        sys.exit("stopped: " + re.sub(r"^[\w.]*(BadInput|NonFiniteLoss): ", "", last_line))
