"""Plumbing shared by the scripts: atomic writes, torchrun setup, safe checkpoints and CSV logs.

Nothing here is part of the method; it is kept out of the scripts so that they read as the paper does. A leaf:
it imports nothing of the project.
"""

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import pickle
import re

import numpy as np
import torch
import torch.distributed as dist

_TEMPORARY = itertools.count()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` (hidden, same extension) and rename it over `path` on success:
    a crash or kill -9 at any moment leaves the previous complete file or the new one, never half of one."""
    folder, name = os.path.split(os.fspath(path))
    extension = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    # unique per writer: processes (shards, ranks) writing the same file never touch each other's temporary
    unique = f"{os.getpid()}-{next(_TEMPORARY)}"
    tmp = os.path.join(folder, f".{name[: len(name) - len(extension)]}.tmp{unique}{extension}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable_folder(path, flag):
    """Before anything is written: `path` is, or can be made as, a folder this process writes in; else one
    line naming the flag and the part of the path in the way."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):  # the nearest part of the path that exists must be a writable folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: {folder} is not a folder this process can write in")


@contextlib.contextmanager
def removed_on_failure(path):
    """A file at `path` (None: nothing) that the block creates is removed again if the block fails, with the
    folder it was made in if that is left empty."""
    existed = path is None or os.path.exists(path)
    folder_existed = path is None or os.path.isdir(os.path.dirname(os.path.abspath(path)))
    try:
        yield
    except BaseException:
        if not existed:  # (torchrun: every process tries; the first one removes)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            if not folder_existed:
                with contextlib.suppress(OSError):  # gone already, or not empty
                    os.rmdir(os.path.dirname(os.path.abspath(path)))
        raise


def remove_temporaries(folder, mine):
    """Delete the hidden temporary files a killed atomic_path writer left in folder, of the files whose name
    without extension `mine(stem)` accepts."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp" in name and mine(name[1:].rsplit(".tmp", 1)[0]):
            os.remove(os.path.join(folder, name))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInput(f"{path}: not a JSON file this code wrote ({error})") from None


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def read_csv(path, columns):
    """Rows of a CSV as dicts; see read_table."""
    return read_table(path, columns)[1]


def read_table(path, columns):
    """(header, rows as dicts) of a CSV; one clear error naming the file, and the row or column, if the file
    or a required column is missing, a column name appears twice, a row has more or fewer fields than the
    header, or the text is not UTF-8. Rows are numbered from the header as row 1, blank lines not counted
    (no row): the callers' messages number rows[i] as i + 2."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            reader = csv.reader(f)
            header = next(reader, [])
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise BadInput(f"{path}: column(s) {twice} appear more than once in the header")
            missing = [c for c in columns if c not in header]
            if missing:
                raise BadInput(f"{path}: missing column(s) {missing}")
            rows = []
            for values in filter(None, reader):  # a blank line is no row
                if len(values) != len(header):
                    raise BadInput(
                        f"{path} row {len(rows) + 2}: {len(values)} fields, the header has {len(header)}"
                    )
                rows.append(dict(zip(header, values)))
            return header, rows
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def write_csv(path, header, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------- command lines


def flag(default=None, help=None, *, names=(), resumed=False, **argparse_keywords):
    """A field of a script's Settings that is also its command-line flag, declared once: the default, the
    help, argparse's keywords (type, choices, action, nargs, ...) and the flag's names (default
    --field-name; a name without dashes is a positional argument). resumed: a resumed training run must
    share the value with its checkpoint (train.py)."""
    metadata = dict(help=help, names=names, resumed=resumed, argparse=argparse_keywords)
    return dataclasses.field(default=default, metadata=metadata)


def args_parser(settings, description):
    """The argparse parser of a Settings dataclass: one argument per field declared with `flag`, in the
    fields' order (the other fields are resolved by the script, not given)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(settings):
        if "argparse" not in field.metadata:
            continue
        names = field.metadata["names"] or ("--" + field.name.replace("_", "-"),)
        keywords = dict(help=field.metadata["help"], **field.metadata["argparse"])
        if names[0].startswith("-"):
            keywords.update(dest=field.name, default=field.default)
        parser.add_argument(*names, **keywords)
    return parser


# ----------------------------------------------------------------------------- logs


def read_log(path, fields):
    """Rows (dicts of str) of a log written by CSVLog; a torn last line (kill -9 while appending) is dropped.
    A file with another header is not this log: refused (its rows would be read under the wrong names)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and reader.fieldnames != list(fields):
            raise BadInput(
                f"{path}: header {reader.fieldnames[:3]}... is not {list(fields)[:3]}... (not this log); "
                "move it away or start a new --output-dir"
            )
        return [row for row in reader if None not in row.values() and all(row.values())]


class CSVLog:
    """An append-only CSV with a header line. Appending is not atomic, so `truncate` (on resume) rewrites the
    file atomically with the rows to keep, which also drops a line torn by a kill."""

    def __init__(self, path, fields):
        self.path, self.fields = path, list(fields)

    def append(self, rows):
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def truncate(self, keep):
        if os.path.exists(self.path):
            rows = [r for r in read_log(self.path, self.fields) if keep(r)]
            write_csv(self.path, self.fields, [[r[k] for k in self.fields] for r in rows])


class NonFiniteLoss(RuntimeError):
    pass


class StepLog:
    """Per-step training values, kept on the device and written every few steps (reading them back costs a
    device synchronisation): averaged over processes, checked to be finite, appended to a CSVLog by rank 0,
    and the last one printed."""

    VALUES = ("loss", "cls_loss", "seg_loss", "grad_norm", "backbone_grad_norm")
    FIELDS = ("epoch", "iteration", *VALUES, "lr", "data_time")  # iterations.csv, what Figure 3 plots

    def __init__(self, path, total_steps, skip_inf_grad=False):
        self.log, self.total, self.skip_inf_grad, self.pending = (
            CSVLog(path, self.FIELDS),
            total_steps,
            skip_inf_grad,
            [],
        )

    def add(self, values, **row):
        """values: (5,) tensor of VALUES; row: the other columns (epoch, iteration, lr, data_time)."""
        self.pending.append((row, values))

    def flush(self):
        values = all_mean(torch.stack([v for _, v in self.pending])).tolist()  # (steps, 5)
        rows = [{**row, **dict(zip(self.VALUES, numbers))} for (row, _), numbers in zip(self.pending, values)]
        self.pending = []
        for r in rows:  # with fp16 the loss scaler skips steps with inf gradients itself (skip_inf_grad)
            if not math.isfinite(r["loss"]) or not (math.isfinite(r["grad_norm"]) or self.skip_inf_grad):
                shown = ", ".join(f"{k} {r[k]}" for k in self.VALUES)
                raise NonFiniteLoss(
                    f"non-finite values ({shown}) at epoch {r['epoch']} iteration {r['iteration']}; the last "
                    "good checkpoint is kept. Lower --lr or check the input data."
                )
        if get_rank() == 0:
            self.log.append(
                [{k: f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in r} for r in rows]
            )
            r = rows[-1]
            losses = f"loss {r['loss']:.4f}  cls {r['cls_loss']:.4f}  seg {r['seg_loss']:.4f}"
            step = f"grad-norm {r['grad_norm']:.3f}  lr {r['lr']:.2e}  data-wait {r['data_time']:.3f}s"
            print(f"epoch {r['epoch']} it {r['iteration'] + 1}/{self.total}  {losses}  {step}", flush=True)


def prepare_folder(folder, logs, stale=()):
    """Remove the `stale` files (an earlier run's), then keep the rows of each log {name: (fields, keep(row))}
    that a resumed run has not redone (dropping a line torn by a kill too)."""
    for name in stale:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name, (fields, keep) in logs.items():
        CSVLog(os.path.join(folder, name), fields).truncate(keep)


# ----------------------------------------------------------------------------- torchrun


def init_distributed(device):
    """torchrun's environment variables -> (rank, world size, device); a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, device


def cpu_state(model):
    """A copy of the model's weights on the CPU (the best epoch's, kept in memory)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def device_ids(device):
    """DistributedDataParallel's device_ids: [the process's GPU], or None on CPU (gloo)."""
    device = torch.device(device)
    return [device.index] if device.type == "cuda" else None


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_mean(tensor):
    """Mean over processes (SUM then divide: the one reduction both gloo and nccl support)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def gather_cases(indices, values, n):
    """Rows `values` (lists of tensors) of cases `indices`, gathered from every process and put in case order;
    checks that each of the n cases was seen exactly once (evaluation splits the cases, it does not pad)."""
    local = (torch.cat(indices).numpy(), torch.cat(values).numpy())
    parts = [local]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    order = np.concatenate([p[0] for p in parts])
    if sorted(order.tolist()) != list(range(n)):
        raise RuntimeError("evaluation did not see every case exactly once")
    return np.concatenate([p[1] for p in parts])[np.argsort(order)]


def clip_grad_norm(parameters, max_norm):
    """Gradient norm before clipping (what Figure 3 plots); max_norm 0 logs it without clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)


def grad_norm(parameters):
    """The L2 norm of these parameters' gradients together (0 if none has one)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """One dict of tensors and plain Python types, written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """Load with weights_only=True: only tensors and plain types are unpickled, so opening a checkpoint that
    someone shared cannot run code hidden in it. Anything else is refused with a message naming the file."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        raise BadInput(
            f"{path}: refused: the checkpoint holds pickled Python objects, not only tensors and plain types "
            f"({reason or 'weights_only load failed'}). Checkpoints of this version never do; load it "
            "yourself with torch.load(..., weights_only=False) only if you trust where it came from."
        ) from None
    except Exception as error:  # empty, truncated, not a torch file: torch raises several kinds
        reason = " ".join(str(error).split())[:200]
        raise BadInput(f"{path}: not a readable checkpoint ({type(error).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not {"model", "args", "task"} <= set(checkpoint):
        raise BadInput(f"{path}: not a checkpoint of train.py (it needs model, args and task entries)")
    return checkpoint


def saved_weights(path):
    """The model weights of a checkpoint, None if there is none (every process waits for rank 0's write)."""
    if dist.is_initialized():
        dist.barrier()
    return load_checkpoint(path)["model"] if os.path.exists(path) else None


def step_seed(seed, rank, iteration):
    """A seed per training step: dropout / stochastic depth draw from it, so a resumed run replays them."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1)[0])


def check_resumable(checkpoint, current, path):
    """A run resumes only with the settings it was trained with (else its steps and crops would not line up);
    `current`: {setting: value now}, compared with the checkpoint's args, world size and task."""
    saved = {**checkpoint["args"], "world_size": checkpoint["world_size"], "task": checkpoint["task"]}
    for key, value in current.items():
        if saved.get(key) != value:
            raise ValueError(f"{path}: trained with {key}={saved.get(key)!r}, now {value!r}")


def resume(path, model, optimizer, scaler, current=None, evaluate_only=False):
    """Load a checkpoint into model, optimizer and scaler (after check_resumable, unless `current` is None);
    returns the checkpoint for its other entries (iteration, best_auc, ...). evaluate_only: the weights alone
    will do (checkpoint_best.pth)."""
    checkpoint = load_checkpoint(path)
    if current is not None:
        check_resumable(checkpoint, current, path)
    model.load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
    elif not evaluate_only:  # checkpoint_best.pth: weights only, enough to evaluate, not to train on
        raise ValueError(f"{path}: holds only the best weights; resume training from checkpoint.pth")
    return checkpoint


class BadInput(ValueError):
    """Input that cannot be used as it is (a file, column, flag or checkpoint); the message names it."""


def one_line(error):
    """The message of an error for a script's last line: an error re-raised from a DataLoader worker carries
    the worker's traceback in its text, of which the last line is the message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return re.sub(r"^[\w.]*(BadInput|NonFiniteLoss): ", "", last)
