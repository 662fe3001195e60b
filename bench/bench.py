"""Speed and memory of the data path and of the segmentation branch, as ratios measured side by side in one
run.

    python bench/bench.py          # CPU: per-sample data path, seg step-time and inference ratios
    python bench/bench.py --gpu    # GPU: samples/s and peak memory at the paper's sizes, data-wait fraction

Every number is a median over repeats, and measurements that are compared are interleaved, so that a noisy
machine shifts both sides alike.
"""

import argparse
import dataclasses
import mmap
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from ctkit import ct_io, precision, structures  # noqa: E402
from ctkit.regions import REGIONS  # noqa: E402
from model import ARCHS, Objective, build_model  # noqa: E402

LUT = structures.lookup_table([(i,) for i in range(1, 7)], {i: str(i) for i in range(1, 118)})  # 6 of 117


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(functions, repeats, warmup=1):
    """Median seconds of each function, run in turn (a, b, a, b, ...) after `warmup` rounds."""
    times = [[] for _ in functions]
    for round_ in range(warmup + repeats):
        for k, fn in enumerate(functions):
            t = timed(fn)
            if round_ >= warmup:
                times[k].append(t)
    return [statistics.median(t) for t in times]


def write_case(folder, shape_dhw=(120, 240, 240), seed=0, case="case"):
    """A CT-like int16 volume and its mask in make_masks.py's format, and the same CT as .nii.gz."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-300, 400, shape_dhw[::-1]).clip(-1000, 1000).astype(np.int16)  # NIfTI order (x, y, z)
    mask = rng.integers(0, 7, shape_dhw[::-1], dtype=np.uint8)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for sub, array in (("ct", ct), ("mask", mask)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        ct_io.save_nifti(array, affine, os.path.join(folder, sub, f"{case}.nii"))
    nib.save(nib.Nifti1Image(ct, affine), os.path.join(folder, f"{case}.nii.gz"))


class SlabMap:
    """The previous reader (before np.memmap): per window, map only its slices with MAP_POPULATE."""

    def __init__(self, path, layout):
        self.path, self.offset = path, layout["offset"]
        self.shape, self.dtype = layout["shape"], layout["dtype"]

    def __getitem__(self, index):
        z, y, x = index
        plane = self.shape[1] * self.shape[2] * self.dtype.itemsize
        start = self.offset + z.start * plane
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            length = start - aligned + (z.stop - z.start) * plane
            mapped = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, flags=flags, offset=aligned)
        count = (z.stop - z.start) * self.shape[1] * self.shape[2]
        slab = np.frombuffer(mapped, self.dtype, count, start - aligned).reshape(-1, *self.shape[1:])
        return slab[:, y, x]


class SlabVolumes:
    def __init__(self, stored):
        self.stored = stored

    def __len__(self):
        return len(self.stored)

    def __getitem__(self, i):
        ct, mask = (SlabMap(path, layout) for path, layout in self.stored.entries[i])
        return ct, mask


def bench_data_path(repeats, n_cases=8):
    """Per training sample: our window read (CT + mask, np.memmap of the stored files, maps kept open),
    the same with every map opened anew (a dataset much larger than the open-map cache), the previous slab
    reader, copying the same windows out of volumes held in RAM, a contiguous memcpy of as many bytes, a run
    with a --structures lookup table (applied to the batch, not the sample) and that lookup on the CPU, and
    CT-CLIP's path. Every side cycles through `n_cases` different volumes."""
    region = REGIONS["chest"]
    pad, crop = region["pad"], region["crop"]
    with tempfile.TemporaryDirectory() as folder:
        cases = [f"case{i}" for i in range(n_cases)]
        for i, case in enumerate(cases):
            write_case(folder, case=case, seed=i)
        volumes = data.StoredVolumes(folder, cases, ("ct", "mask"), read_mask=True)
        labels = np.zeros((n_cases, 18))
        dataset = data.CTDataset(cases, volumes, labels, pad, crop, train=True, with_mask=True)
        slab = data.CTDataset(cases, SlabVolumes(volumes), labels, pad, crop, train=True, with_mask=True)
        looked_up = data.CTDataset(cases, volumes, labels, pad, crop, train=True, with_mask=True, lut=LUT)
        in_ram = [tuple(np.array(v) for v in volumes[i]) for i in range(n_cases)]
        size = int(np.prod(crop))
        flat = [(np.ones(size, np.int16), np.ones(size, np.uint8)) for _ in range(n_cases)]
        keys = iter(range(10**6))

        def ours(ds=dataset):  # per training sample, what a DataLoader worker does (collation: the one copy)
            batch = torch.utils.data.default_collate([ds[next(keys)]])
            assert batch["ct"].shape == (1, 1, *crop) and batch["mask"].shape == (1, *crop)
            return batch

        def cpu_lookup():  # the lookup where the batch is, here the CPU (train.py: the batch's device)
            batch = ours(looked_up)
            looked_up.seg_classes(batch["mask"], batch["index"])

        def reopened():
            volumes.maps.clear()
            ours()

        def window_copy():  # the same random windows, copied out of volumes that are already in RAM
            key = next(keys)
            ct, mask = in_ram[key % n_cases]
            starts = data.window_start(ct.shape, pad, crop, np.random.default_rng([0, key]))
            window = tuple(slice(s, s + c) for s, c in zip(starts, crop))
            np.array(ct[window]), np.array(mask[window])

        def memcpy():  # contiguous copies of as many bytes into new arrays
            ct, mask = flat[next(keys) % n_cases]
            np.array(ct), np.array(mask)

        def naive():  # CT-CLIP style: decompress the whole volume, crop, float
            volume = nib.load(os.path.join(folder, f"{cases[next(keys) % n_cases]}.nii.gz")).get_fdata()
            starts = data.window_start(volume.shape, pad[::-1], crop[::-1])
            window = tuple(slice(s, s + c) for s, c in zip(starts, crop[::-1]))
            np.ascontiguousarray(volume[window], np.float32)

        sides = [ours, reopened, lambda: ours(slab), window_copy, memcpy, lambda: ours(looked_up), cpu_lookup]
        times = interleaved(sides, repeats, warmup=n_cases) + interleaved([naive], max(3, repeats // 10), 1)
    mb = int(np.prod(crop)) * 3 / 1e6
    print(
        f"data path, {crop} windows of {n_cases} different {pad} int16 volumes + uint8 masks ({mb:.1f} MB):"
    )
    return data_path_ratios(times)


DATA_PATH_SIDES = (  # (what, ratio name, ratio key): each side of bench_data_path, in its order
    ("ours: np.memmap of the stored CT and mask, kept open", None, None),
    ("ours, every map opened anew", "reopened / ours", "reopened_over_ours"),
    ("previous reader: slices mapped per window (MAP_POPULATE)", "previous / ours", "previous_over_ours"),
    ("copy of the same windows out of volumes in RAM", "ours / copy", "ours_over_copy"),
    ("contiguous memcpy of as many bytes", "ours / memcpy", "ours_over_memcpy"),
    ("ours, a run with a --structures lookup table", "lookup / ours", "lookup_over_ours"),
    (
        "  + that lookup on the CPU (train.py: on the batch's device)",
        "cpu lookup / ours",
        "cpu_lookup_over_ours",
    ),
    ("naive: nib.load(.nii.gz).get_fdata(), crop, float", "naive / ours", "naive_over_ours"),
)


def data_path_ratios(times):
    """Print each side's median seconds and its ratio to ours (ours / it where the name says so); return
    {ratio key: ratio}."""
    ratios = {}
    for (text, name, key), t in zip(DATA_PATH_SIDES, times):
        if key:
            ratios[key] = times[0] / t if name.startswith("ours ") else t / times[0]
        print(f"  {text:<62}{1e3 * t:7.2f} ms" + (f"   {name} = {ratios[key]:.2f}" if key else ""))
    return ratios


def train_step(objective, optimizer, x, labels, mask):
    loss, _, _ = objective(x, labels, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_seg_overhead(repeats, crop=(32, 64, 64), batch=2):
    print(f"segmentation branch on CPU, crop {crop}, batch {batch}, medians of {repeats} interleaved steps:")
    task = data.make_task("ctrate", crop)  # 18 classes, 6 chest structures
    x, labels = torch.randn(batch, 1, *crop), torch.randint(0, 2, (batch, len(task.classes))).float()
    mask = torch.randint(0, 7, (batch, *crop), dtype=torch.uint8)
    results = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        plain = build_model(arch, task).train()
        seg = build_model(arch, task, seg=True).train()
        seg.load_state_dict(plain.state_dict(), strict=False)  # same backbone and head weights
        chunked = build_model(arch, task, seg=True).train()
        chunked.load_state_dict(seg.state_dict())
        objectives = [Objective(m, task.kind, seg_chunk=c) for m, c in ((plain, 0), (seg, 0), (chunked, 8))]
        optimizers = [torch.optim.AdamW(m.parameters(), 1e-5) for m in (plain, seg, chunked)]
        steps = [
            partial(train_step, f, o, x, labels, mask if f.classifier.seg_head is not None else None)
            for f, o in zip(objectives, optimizers)
        ]
        t_plain, t_seg, t_chunked = interleaved(steps, repeats)
        plain.eval(), seg.eval()
        with torch.no_grad():
            i_plain, i_seg = interleaved([partial(plain, x), partial(seg, x)], repeats)
        results[arch] = {
            "train_step_ratio": t_seg / t_plain,
            "chunked_ratio": t_chunked / t_plain,
            "inference_ratio": i_seg / i_plain,
        }
        print(
            f"  {arch:5s} train step w/ seg / w/o = {t_seg:.3f} s / {t_plain:.3f} s = {t_seg / t_plain:.3f}"
            f", with --seg-chunk 8: {t_chunked / t_plain:.3f}; inference seg-trained / plain "
            f"{i_seg / i_plain:.3f}"
        )
    return results


def step_stats(model, device, batch, crop, seg, steps, structures=6, seg_chunk=0, amp=True):
    """(samples/s, peak GiB) of training steps of `model` (bf16 autocast with amp, else fp32), median of
    `steps` after 2 warm-up steps."""
    model = model.to(device).train()
    objective = Objective(model, "multilabel", seg_chunk=seg_chunk)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-5)
    ct = torch.randint(-1000, 1000, (batch, 1, *crop), dtype=torch.int16, device=device)
    labels = torch.randint(0, 2, (batch, model.head.out_features), device=device).float()
    mask = torch.randint(0, structures + 1, (batch, *crop), dtype=torch.uint8, device=device) if seg else None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            train_step(objective, optimizer, ct_io.normalize(ct, (-1000, 200)), labels, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return batch / statistics.median(times[2:]), peak


def bench_gpu(steps, device, archs, tiny=False, chunk=8, amp=True):
    """Samples/s and peak memory per model w/o seg, w/ seg and w/ seg + --seg-chunk, Table 4's batch sizes,
    chest crop, bf16 (fp32 on a CPU whose bf16 is wrong: ctkit/precision.py); then R3D-18's seg head over all
    117 TotalSegmentator classes (118 with background)."""
    crop = (16, 32, 32) if tiny else REGIONS["chest"]["crop"]  # tiny: a CPU rehearsal of the code path
    name = precision.device_name(device)
    cuda = torch.version.cuda if device == "cuda" else "-"
    arithmetic = "bf16 autocast" if amp else "fp32 (bf16 3D convolutions are wrong on this CPU)"
    print(f"{device}: {name}, torch {torch.__version__}, CUDA {cuda}, crop {crop}, {arithmetic}")
    print(f"  {'model':6s} {'batch':>5s} {'seg':>12s} {'samples/s':>10s} {'peak GiB':>9s}")
    task, results = data.make_task("ctrate", crop), {}
    for arch in archs:
        batch = 2 if tiny else train.TABLE4_BATCH[("chest", arch)]
        rows = {}
        for label, seg, seg_chunk in (("w/o", False, 0), ("w/", True, 0), (f"w/ chunk {chunk}", True, chunk)):
            torch.manual_seed(0)
            model = build_model(arch, task, seg)
            rows[label] = step_stats(model, device, batch, crop, seg, steps, seg_chunk=seg_chunk, amp=amp)
            print(f"  {arch:6s} {batch:5d} {label:>12s} {rows[label][0]:10.2f} {rows[label][1]:9.2f}")
            del model
        for label in ("w/", f"w/ chunk {chunk}"):
            step, memory = rows["w/o"][0] / rows[label][0], rows[label][1] / rows["w/o"][1]
            print(f"  {arch:6s} {label} / plain: step time {step:.3f}, peak memory {memory:.3f}")
        results[arch] = rows
    all_classes = dataclasses.replace(task, structures=tuple(f"class_{i}" for i in range(117)))
    batch = 2 if tiny else train.TABLE4_BATCH[("chest", "r3d")]
    for label, seg_chunk in (("117 classes", 0), (f"117, chunk {chunk}", chunk)):
        torch.manual_seed(0)
        model = build_model("r3d", all_classes, True)
        try:
            rows = step_stats(model, device, batch, crop, True, steps, 117, seg_chunk, amp)
            print(f"  {'r3d':6s} {batch:5d} {label:>12s} {rows[0]:10.2f} {rows[1]:9.2f}")
            results[f"r3d {label}"] = rows
        except torch.cuda.OutOfMemoryError:
            print(f"  {'r3d':6s} {batch:5d} {label:>12s} out of memory")
        del model
    return results


def bench_data_wait(device, steps, workers, tiny=False, amp=True):
    """Fraction of a training step spent waiting for the next batch, real DataLoader over stored volumes."""
    region = REGIONS["chest"]
    crop, pad = ((32, 48, 48), (40, 60, 60)) if tiny else (region["crop"], region["pad"])
    batch = 2 if tiny else train.TABLE4_BATCH[("chest", "r3d")]
    with tempfile.TemporaryDirectory() as folder:
        cases = [f"case{i}" for i in range(8)]
        write_case(folder, pad)
        for case in cases:
            for sub in ("ct", "mask"):
                os.link(os.path.join(folder, sub, "case.nii"), os.path.join(folder, sub, f"{case}.nii"))
        volumes = data.StoredVolumes(folder, cases, ("ct", "mask"), read_mask=True)
        dataset = data.CTDataset(cases, volumes, np.zeros((8, 18)), pad, crop, True, with_mask=True, lut=LUT)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (steps + 2))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=device == "cuda",
            persistent_workers=workers > 0,
        )
        model = build_model("r3d", data.make_task("ctrate", crop), seg=True).to(device).train()
        objective, optimizer = Objective(model, "multilabel"), torch.optim.AdamW(model.parameters(), 1e-5)
        wait = total = 0.0
        start = time.perf_counter()
        for step, sample in enumerate(loader):
            got = time.perf_counter()
            ct = ct_io.normalize(sample["ct"].to(device, non_blocking=True), region["window"])
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                labels, mask = sample["label"].to(device).float(), sample["mask"].to(device)
                mask = dataset.seg_classes(mask, sample["index"])  # --structures' lookup, on the device
                train_step(objective, optimizer, ct, labels, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                wait, total = wait + got - start, total + time.perf_counter() - start
            start = time.perf_counter()
    share = 100 * wait / total
    print(f"  data wait: {share:.1f}% of step time (r3d w/ seg, batch {batch}, {workers} workers)")
    return wait / total


def memory_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process from /proc, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def structures_worker(classes, steps, crop, batch, chunk):
    """One configuration in this (fresh) process: median step seconds and the peak resident memory that the
    model, its optimizer and the training steps added to the process (MiB), one line for bench_structures."""
    torch.manual_seed(0)
    task = data.make_task("ctrate", crop)
    task = dataclasses.replace(task, structures=tuple(f"class_{i}" for i in range(classes)))
    x, labels = torch.randn(batch, 1, *crop), torch.randint(0, 2, (batch, len(task.classes))).float()
    mask = torch.randint(0, classes + 1, (batch, *crop), dtype=torch.uint8)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak (VmHWM) restarts from the current RSS
        f.write("5")
    before = memory_mib("VmRSS")
    model = build_model("r3d", task, seg=True).train()
    objective, optimizer = Objective(model, task.kind, seg_chunk=chunk), torch.optim.AdamW(model.parameters())
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(objective, optimizer, x, labels, mask)
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times[1:])} {memory_mib('VmHWM') - before}")


def bench_structures(repeats, crop=(32, 64, 64), batch=2):
    """--structures all (117 classes + background) against paper (6 + background): R3D-18 training steps on
    CPU, each configuration in its own process (so that each peak memory is its own), interleaved."""
    import subprocess

    print(f"--structures all vs paper on CPU, r3d, crop {crop}, batch {batch}, {repeats} processes each:")
    configs = {"paper": (6, 0), "all": (117, 0), "all, --seg-chunk 8": (117, 8)}
    results = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (classes, chunk) in configs.items():
            command = [
                sys.executable,
                __file__,
                "--structures-worker",
                str(classes),
                str(chunk),
                *map(str, crop),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            results[name].append([float(v) for v in out[-2:]])
    paper = np.median(results["paper"], 0)
    ratios = {}
    for name, values in results.items():
        t, m = np.median(values, 0)
        ratios[name] = (t / paper[0], m / paper[1])
        print(
            f"  {name:<20} step {t:.3f} s ({t / paper[0]:.2f}x paper), peak memory of the model and steps "
            f"{m:.0f} MiB ({m / paper[1]:.2f}x)"
        )
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark at the paper's sizes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes (checks the GPU code path on a CPU)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seg-chunk", type=int, default=8, help="--gpu: the chunked seg loss, N slices")
    parser.add_argument("--structures-worker", type=int, nargs=5, help=argparse.SUPPRESS)  # bench_structures
    args = parser.parse_args()
    if args.structures_worker:
        classes, chunk, *crop = args.structures_worker
        return structures_worker(classes, 3, tuple(crop), 2, chunk)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores: {precision.device_name()}")
    if args.gpu:
        amp = precision.bf16_fault(args.device) is None  # bf16 where it trains right (ctkit/precision.py)
        bench_gpu(args.repeats, args.device, ARCHS, args.tiny, args.seg_chunk, amp)
        bench_data_wait(args.device, args.repeats, args.workers, args.tiny, amp)
        return
    bench_data_path(args.repeats)
    bench_seg_overhead(max(5, args.repeats // 3))
    bench_structures(max(3, args.repeats // 10))


if __name__ == "__main__":
    main()
