"""Train a 3D CT classifier, optionally with the auxiliary anatomy-segmentation loss (paper §2.2, §3.1, A.3).

    python train.py --seg                                   # synthetic chest phantoms, R3D-18, ~6 min on 2 CPU cores
    python train.py --dataset radchest --model r3d --seg --data-path ... --amp
    torchrun --nproc_per_node=8 train.py --dataset ctrate --model mvit --seg --data-path ... --amp

Loss (eq. 4): BCE-with-logits on the findings + `--seg-weight` * CE between the upsampled 1x1x1-conv
segmentation logits and the TotalSegmentator mask; without `--seg` there is no segmentation head at all.
RATIC (eq. 5): weighted BCE (bowel, extravasation) + weighted CE (kidney, liver, spleen grades)
+ 0.1 * weighted BCE of p_any_injury + the segmentation loss.
AdamW (weight decay 1e-4), cosine learning rate per iteration, gradient-norm clipping at 5.0, and the
Table 4 learning rate / batch size / epochs for the dataset x model unless given. The run folder gets
iterations.csv (loss, cls_loss, seg_loss, grad-norm before clipping, lr per step), epochs.csv (validation
metrics), checkpoint.pth (latest) and checkpoint_best.pth (best validation macro AUC), written atomically,
predictions_{val,test}.csv, metrics_{val,test}.{csv,json} and, with --seg, dice_{val,test}.json. After a
crash, rerun the same command with `--resume`: on CPU it ends exactly where an uninterrupted run would.
"""
import argparse
import csv
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

import data
from evaluate import compute_metrics, dice_counts, dice_summary, evaluate_predictions, write_json, write_predictions
from model import (ARCHS, CTClassifier, load_pretrained, num_outputs, probabilities, ratic_loss, upsample_depth,
                   upsample_planar, upsample_seg)

TABLE4_LR = {("chest", "r3d"): 1e-4, ("chest", "mvit"): 1e-4, ("chest", "swin"): 5e-5,
             ("abdomen", "r3d"): 1e-4, ("abdomen", "mvit"): 1e-5, ("abdomen", "swin"): 1e-5}
TABLE4_BATCH = {("chest", "r3d"): 10, ("chest", "swin"): 6, ("chest", "mvit"): 4,
                ("abdomen", "r3d"): 5, ("abdomen", "swin"): 2, ("abdomen", "mvit"): 2}
TABLE4_EPOCHS = {"ctrate": 20, "radchest": 100, "ratic": 100, "synthetic": 6}  # synthetic: ours, not the paper's


class NonFiniteLoss(RuntimeError):
    pass


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", choices=("synthetic", "ctrate", "radchest", "ratic"))
    parser.add_argument("--model", default="r3d", choices=ARCHS)
    parser.add_argument("--seg", action="store_true", help="add the auxiliary segmentation head and loss")
    parser.add_argument("--pretrained", nargs="?", const="download", default=None, metavar="PATH",
                        help="start from Kinetics-400 weights: torchvision's weights API, or this state-dict file")
    parser.add_argument("--seg-loss", default="ce", choices=("ce", "dice", "dice_ce"))
    parser.add_argument("--seg-weight", default=1.0, type=float)
    parser.add_argument("--data-path", default=None, help="dataset root holding the label files")
    parser.add_argument("--prep-dir", default=None, help="make_masks.py output (ct/, mask/); default <data-path>/prep")
    parser.add_argument("--skip-missing", action="store_true", help="skip (and list) labelled cases without files")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this fraction of training patients for validation (default: none, as the paper)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the RATIC patient split (drawn once)")
    parser.add_argument("--output-dir", default=None, help="run folder (default runs/<dataset>_<model>[_seg]_s<seed>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="checkpoint to resume from; without a value: <output-dir>/checkpoint.pth if present")
    parser.add_argument("--test-only", action="store_true", help="only evaluate the --resume checkpoint on test")
    parser.add_argument("-b", "--batch-size", type=int, default=None, help="per process (default: Table 4)")
    parser.add_argument("-j", "--workers", type=int, default=min(8, (os.cpu_count() or 2) // 2))
    parser.add_argument("--epochs", type=int, default=None, help="default: Table 4")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: Table 4)")
    parser.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    parser.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine")
    parser.add_argument("--clip-grad-norm", type=float, default=5.0, help="0 disables clipping (norm still logged)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 + grad scaling where bf16 is missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--print-freq", type=int, default=10, help="iterations between log flushes")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N iterations")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (short runs)")
    parser.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="override crop")
    parser.add_argument("--synthetic-cases", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"))
    return parser


def cosine_lr(iteration, total_iterations, base_lr, warmup_iterations=0):
    if iteration < warmup_iterations:
        return base_lr * (iteration + 1) / warmup_iterations
    progress = (iteration - warmup_iterations) / max(1, total_iterations - warmup_iterations)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def step_seed(seed, rank, iteration):
    """Every step draws dropout/stochastic depth from its own seed, so a resumed run replays them exactly."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1)[0])


def classification_loss(logits, labels, info):
    """Eq. 4's L_cls: BCE-with-logits over the findings; for RATIC eq. 5's L_cls1 + L_cls2 + 0.1 L_any_injury."""
    if info["task"] == "ratic":
        return ratic_loss(logits, labels, info["classes"])
    return F.binary_cross_entropy_with_logits(logits, labels)


def segmentation_terms(planar, target, start, depth, num_labels, dice):
    """Sums over output slices start:start + n: CE, and (for Dice) per label intersection, predicted and true mass."""
    logits = upsample_depth(planar, depth, start, start + target.shape[1])  # (B, S, n, H, W)
    ce = F.cross_entropy(logits, target, reduction="sum")[None]
    if not dice:
        return ce
    probs = logits.softmax(1)
    onehot = F.one_hot(target, num_labels).permute(0, 4, 1, 2, 3).to(probs.dtype)
    return torch.cat([ce, (probs * onehot).sum((0, 2, 3, 4)), probs.sum((0, 2, 3, 4)), onehot.sum((0, 2, 3, 4))])


def segmentation_loss(seg, target, kind, chunk=8):
    """Eq. 3 + CE (or Dice, Dice + CE) at the input resolution. seg: (B, S, d, h, w) logits of the 1x1x1 conv,
    target: (B, D, H, W) labels. The full-resolution logits are made `chunk` slices at a time and remade in the
    backward pass (checkpointing): same loss and gradients as F.interpolate + F.cross_entropy, without keeping a
    (B, S, D, H, W) tensor and its softmax in memory."""
    depth, num_labels = target.shape[1], seg.shape[1]
    planar = upsample_planar(seg.float(), target.shape[1:])  # (B, S, d, H, W): d / D of the full size
    dice = kind in ("dice", "dice_ce")
    sums = sum(torch.utils.checkpoint.checkpoint(segmentation_terms, planar, target[:, z:z + chunk], z, depth,
                                                 num_labels, dice, use_reentrant=False) for z in range(0, depth, chunk))
    loss = sums[0] / target.numel() if kind in ("ce", "dice_ce") else sums.new_zeros(())
    if dice:  # soft Dice over the batch, foreground structures only
        intersection, predicted, true = sums[1:].view(3, num_labels)
        loss = loss + 1 - ((2 * intersection + 1e-5) / (predicted + true + 1e-5))[1:].mean()
    return loss


def train_one_epoch(model, optimizer, scaler, loader, device, epoch, args, info, first_step, best_auc):
    model.train()
    iters_per_epoch, total = args.iters_per_epoch, args.iters_per_epoch * args.epochs
    pending, t_data, t_step = [], 0.0, time.time()
    for i, batch in enumerate(loader, start=first_step):
        it = epoch * iters_per_epoch + i
        t_data += time.time() - t_step
        lr = cosine_lr(it, total, args.lr, int(args.lr_warmup_epochs * iters_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(args.seed, args.rank, it))
        ct = data.normalize(batch["ct"].to(device, non_blocking=True), info["window"])  # (B, 1, D, H, W)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp):
            if args.seg:
                logits, seg = model(ct)
                seg_loss = segmentation_loss(seg, batch["mask"].to(device).long(), args.seg_loss)
            else:
                logits, seg_loss = model(ct), torch.zeros((), device=device)
            cls_loss = classification_loss(logits.float(), labels, info)
            loss = cls_loss + args.seg_weight * seg_loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pending.append((it, lr, torch.stack([loss.detach(), cls_loss.detach(), seg_loss.detach(), grad_norm])))

        last = i + 1 == iters_per_epoch
        checkpoint_now = args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and not last
        if len(pending) == args.print_freq or last or checkpoint_now:
            flush_log(pending, args, epoch, t_data)
            pending, t_data = [], 0.0
        if checkpoint_now:
            save_checkpoint(args, model, optimizer, scaler, it + 1, best_auc)
        if last:
            break
        t_step = time.time()


def flush_log(pending, args, epoch, data_time):
    """Average over processes once per flush (not per step), stop on a non-finite loss, append to the CSV."""
    values = torch.stack([v for _, _, v in pending])  # (steps, 4): loss, cls_loss, seg_loss, grad_norm
    if args.distributed:
        dist.all_reduce(values)  # SUM: the one reduction both gloo and nccl support
        values /= args.world_size
    values = values.tolist()
    for (it, _, _), (loss, cls_loss, seg_loss, grad_norm) in zip(pending, values):
        grad_ok = math.isfinite(grad_norm) or args.amp_dtype == torch.float16  # fp16 scaler skips those steps
        if not (math.isfinite(loss) and grad_ok):
            raise NonFiniteLoss(f"non-finite loss {loss} (cls {cls_loss}, seg {seg_loss}, grad-norm {grad_norm}) at "
                                f"epoch {epoch} iteration {it}; the last good checkpoint is kept. Lower --lr or check "
                                f"the input data.")
    if args.rank == 0:
        with open(os.path.join(args.output_dir, "iterations.csv"), "a", newline="") as f:
            writer = csv.writer(f)
            for (it, lr, _), row in zip(pending, values):
                writer.writerow([epoch, it, *(f"{v:.6g}" for v in row), f"{lr:.6g}", f"{data_time / len(pending):.4f}"])
        it, lr, _ = pending[-1]
        loss, cls_loss, seg_loss, grad_norm = values[-1]
        print(f"epoch {epoch} it {it + 1}/{args.iters_per_epoch * args.epochs}  loss {loss:.4f}  cls {cls_loss:.4f}  "
              f"seg {seg_loss:.4f}  grad-norm {grad_norm:.3f}  lr {lr:.2e}  data-wait {data_time / len(pending):.3f}s",
              flush=True)


@torch.no_grad()
def evaluate(model, loader, device, args, info, with_dice=False):
    """Class probabilities for every case of the loader's dataset, each exactly once across processes, and with
    `with_dice` the per-case Dice counts of the segmentation head (B, structures, 3)."""
    model.eval()
    indices, probs, dice = [], [], []
    for batch in loader:
        ct = data.normalize(batch["ct"].to(device, non_blocking=True), info["window"])
        with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp):
            logits, seg = model(ct, with_seg=True) if with_dice else (model(ct), None)
        probs.append(probabilities(logits.float(), info["task"], info["classes"]).cpu())
        indices.append(batch["index"])
        if with_dice:
            labels = upsample_seg(seg.float(), ct.shape[2:]).argmax(1)
            dice.append(dice_counts(labels, batch["mask"].to(device), seg.shape[1]).cpu())
    if not indices:  # more processes than cases: this one had nothing to evaluate
        indices, probs = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, len(info["classes"]))]
        dice = [torch.zeros(0, len(info["structures"]), 3, dtype=torch.long)]
    local = [torch.cat(indices).numpy(), torch.cat(probs).numpy(), torch.cat(dice).numpy() if with_dice else None]
    parts = [local]
    if args.distributed:
        parts = [None] * args.world_size
        dist.all_gather_object(parts, local)
    order = np.concatenate([p[0] for p in parts])
    if sorted(order.tolist()) != list(range(len(loader.dataset))):
        raise RuntimeError("evaluation did not see every case exactly once")
    y_prob = np.concatenate([p[1] for p in parts])[np.argsort(order)]
    counts = np.concatenate([p[2] for p in parts])[np.argsort(order)] if with_dice else None
    return y_prob, loader.dataset.labels, counts


def save_checkpoint(args, model, optimizer, scaler, iteration, best_auc, name="checkpoint.pth"):
    if args.rank != 0:
        return
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "args": vars(args), "iteration": iteration, "best_auc": best_auc}
    path = os.path.join(args.output_dir, name)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a kill -9 leaves either the old or the new file, never half of one


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def truncate_csv(path, keep):
    """Drop rows logged after the checkpoint we resume from (and a torn last line after a kill)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) > 1 and r[1].lstrip("-").isdigit() and keep(int(r[1]))]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(path + ".tmp", path)


def make_loader(dataset, args, train):
    if train:
        sampler = data.EpochSampler(torch.utils.data.DistributedSampler(
            dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed, drop_last=True),
            len(dataset), args.batch_size)
    else:  # every case exactly once: no padding duplicates in the metrics
        sampler = list(range(args.rank, len(dataset), args.world_size))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=train,
                                       collate_fn=dataset.collate,
                                       num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                       persistent_workers=args.workers > 0)


def init_distributed(args):
    args.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    if args.distributed:  # launched by torchrun
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.local_rank)
            args.device = f"cuda:{args.local_rank}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def set_defaults(args, info):
    key, notes = (info["region"], args.model), []
    for name, table, table_key in (("lr", TABLE4_LR, key), ("batch_size", TABLE4_BATCH, key),
                                   ("epochs", TABLE4_EPOCHS, args.dataset)):
        if getattr(args, name) is None:
            setattr(args, name, table[table_key])
            notes.append(f"{name} {getattr(args, name)} (Table 4 default)")
        else:
            notes.append(f"{name} {getattr(args, name)} (given; Table 4: {table[table_key]})")
    if args.output_dir is None:
        name = f"{args.dataset}_{args.model}{'_seg' if args.seg else ''}{'_pre' if args.pretrained else ''}_s{args.seed}"
        args.output_dir = os.path.join("runs", name)
    return notes


def main(args):
    init_distributed(args)
    device = torch.device(args.device)
    args.amp_dtype = torch.bfloat16
    if args.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        args.amp_dtype = torch.float16
    if args.data_path and not args.prep_dir:
        args.prep_dir = os.path.join(args.data_path, "prep")
    try:
        splits, info = data.build_datasets(args)
    except (OSError, data.BadInput) as error:
        sys.exit(f"cannot build the {args.dataset} dataset: {error}")
    notes = set_defaults(args, info)
    args.info = info  # with the checkpoint's args, enough to rebuild the model and its preprocessing
    os.makedirs(args.output_dir, exist_ok=True)
    if args.rank == 0:
        write_json(os.path.join(args.output_dir, "config.json"), {k: v for k, v in vars(args).items() if k != "amp_dtype"})
        print(f"{args.dataset} / {args.model} / {'with' if args.seg else 'without'} segmentation supervision -> "
              f"{args.output_dir}\n  " + "\n  ".join(notes) + f"\n  crop {info['crop']} (D, H, W), HU window "
              f"{info['window']}, {len(info['classes'])} classes, cases: "
              + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f", {args.world_size} process(es)")

    if args.resume == "auto":  # resume if there is something to resume from: a requeued job reruns one command
        args.resume = os.path.join(args.output_dir, "checkpoint.pth")
        if not os.path.exists(args.resume):
            args.resume = None
    torch.manual_seed(args.seed)
    seg_classes = len(info["structures"]) + 1 if args.seg else 0
    model = CTClassifier(args.model, num_outputs(info["task"], len(info["classes"])), info["crop"], seg_classes=seg_classes)
    if args.pretrained and not args.resume:
        try:
            report = load_pretrained(model.backbone, args.pretrained)
        except (OSError, ValueError, RuntimeError) as error:
            sys.exit(f"cannot load pretrained weights: {error}")
        if args.rank == 0:
            print("\n".join(report))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == torch.float16)
    iteration, best_auc = 0, -math.inf
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        for key in ("dataset", "model", "seg", "batch_size", "world_size"):
            if checkpoint["args"][key] != getattr(args, key) and not args.test_only:
                sys.exit(f"{args.resume}: trained with {key}={checkpoint['args'][key]!r}, now {getattr(args, key)!r}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        iteration, best_auc = checkpoint["iteration"], checkpoint["best_auc"]
        if args.rank == 0:
            print(f"resumed from {args.resume} at iteration {iteration}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.local_rank] if device.type == "cuda" else None)

    train_loader = make_loader(splits["train"], args, train=True)
    eval_loaders = {name: make_loader(splits[name], args, train=False) for name in ("val", "test") if name in splits}
    args.iters_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    if args.iters_per_epoch == 0:
        sys.exit(f"training set of {len(splits['train'])} cases is smaller than one batch of {args.batch_size}")
    if args.rank == 0:
        truncate_csv(os.path.join(args.output_dir, "iterations.csv"), lambda it: it < iteration)
        truncate_csv(os.path.join(args.output_dir, "epochs.csv"), lambda ep: (ep + 1) * args.iters_per_epoch <= iteration)

    start_epoch, first_step = divmod(iteration, args.iters_per_epoch)
    for epoch in range(start_epoch, args.epochs if not args.test_only else start_epoch):
        train_loader.sampler.set_epoch(epoch, skip=first_step)
        t0 = time.time()
        train_one_epoch(model, optimizer, scaler, train_loader, device, epoch, args, info, first_step, best_auc)
        first_step, iteration = 0, (epoch + 1) * args.iters_per_epoch
        name = "val" if "val" in eval_loaders else "test"
        y_prob, y_true, _ = evaluate(model, eval_loaders[name], device, args, info)
        rows, macro, _ = compute_metrics(y_true, y_prob, info["classes"])
        if args.rank == 0:
            print(f"epoch {epoch} done in {time.time() - t0:.0f}s: {name} macro AUC {100 * macro['auc']:.2f}  "
                  + "  ".join(f"{r['class']} {100 * r['auc']:.1f}" for r in rows), flush=True)
            with open(os.path.join(args.output_dir, "epochs.csv"), "a", newline="") as f:
                csv.writer(f).writerow([epoch, iteration, name, f"{macro['auc']:.6f}", f"{time.time() - t0:.1f}"])
        if name == "val" and macro["auc"] > best_auc:  # never select on the test set
            best_auc = macro["auc"]
            save_checkpoint(args, model, optimizer, scaler, iteration, best_auc, "checkpoint_best.pth")
        save_checkpoint(args, model, optimizer, scaler, iteration, best_auc)

    # Final predictions: with a validation split independent of test, from the best-on-validation checkpoint.
    best_path = os.path.join(args.output_dir, "checkpoint_best.pth")
    if "val" in eval_loaders and os.path.exists(best_path) and not args.test_only:
        unwrap(model).load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["model"])
    for name, loader in eval_loaders.items():
        y_prob, y_true, counts = evaluate(model, loader, device, args, info, with_dice=args.seg)
        if args.rank == 0:
            path = os.path.join(args.output_dir, f"predictions_{name}.csv")
            write_predictions(path, loader.dataset.case_ids, y_true, y_prob, info["classes"])
            if args.seg:  # did the auxiliary branch learn the anatomy? Dice of its argmax on the centre crops
                write_json(os.path.join(args.output_dir, f"dice_{name}.json"), dice_summary(counts, info["structures"]))
    if args.rank == 0:
        if "val" in eval_loaders:  # its thresholds are the ones to apply to new cases (evaluate.py --predict)
            evaluate_predictions(os.path.join(args.output_dir, "predictions_val.csv"), quiet=True)
        evaluate_predictions(os.path.join(args.output_dir, "predictions_test.csv"))
    if args.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (NonFiniteLoss, data.BadInput) as error:  # from a DataLoader worker, the message ends the traceback
        last_line = str(error).strip().splitlines()[-1]
        sys.exit("stopped: " + re.sub(r"^[\w.]*(BadInput|NonFiniteLoss): ", "", last_line))
