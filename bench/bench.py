"""Speed and memory of the data path and of the segmentation branch, as ratios measured side by side in one run.

    python bench/bench.py                 # CPU: per-sample data path, seg step-time and inference ratios
    python bench/bench.py --gpu           # GPU: samples/s and peak memory at the paper's sizes, data-wait fraction

Every number is a median over repeats, and measurements that are compared are interleaved, so that a noisy
machine shifts both sides alike.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import make_masks  # noqa: E402
import train  # noqa: E402
from model import ARCHS, CTClassifier  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
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
        make_masks.save_atomic(array, affine, make_masks.Path(folder) / sub / f"{case}.nii")
    nib.save(nib.Nifti1Image(ct, affine), os.path.join(folder, f"{case}.nii.gz"))


def bench_data_path(repeats, n_cases=8):
    """Per training sample: our window read (CT + mask, through a memory map of the stored files) vs copying the
    same windows out of the same volumes held in RAM (the copy itself; "memcpy of the crop"), a contiguous memcpy
    of the same number of bytes, and CT-CLIP's path. Every side cycles through `n_cases` different volumes."""
    region = data.REGIONS["chest"]
    pad, crop = region["pad"], region["crop"]
    with tempfile.TemporaryDirectory() as folder:
        cases = [f"case{i}" for i in range(n_cases)]
        for i, case in enumerate(cases):
            write_case(folder, case=case, seed=i)
        volumes = data.StoredVolumes(folder, cases, with_mask=True)
        dataset = data.CTDataset(cases, volumes, np.zeros((n_cases, 18)), pad, crop, train=True, with_mask=True)
        in_ram = [(np.array(ct[tuple(slice(0, n) for n in ct.shape)]), np.array(mask[tuple(slice(0, n) for n in mask.shape)]))
                  for ct, mask in (volumes[i] for i in range(n_cases))]
        flat = [(np.ones(int(np.prod(crop)), np.int16), np.ones(int(np.prod(crop)), np.uint8)) for _ in range(n_cases)]
        n_bytes = int(np.prod(crop)) * 3
        keys = iter(range(10 ** 6))

        def ours():  # what a DataLoader worker does per training sample: its windows of CT and mask, into a batch
            batch = dataset.collate([dataset[next(keys)]])
            assert batch["ct"].shape == (1, 1, *crop) and batch["mask"].shape == (1, *crop)

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
            np.ascontiguousarray(volume[tuple(slice(s, s + c) for s, c in zip(starts, crop[::-1]))], dtype=np.float32)

        t_ours, t_copy, t_memcpy = interleaved([ours, window_copy, memcpy], repeats, warmup=n_cases)
        (t_naive,) = interleaved([naive], max(3, repeats // 10), warmup=1)
    print(f"data path, {crop} windows of {n_cases} different {pad} int16 volumes + uint8 masks ({n_bytes / 1e6:.1f} MB), medians:")
    print(f"  ours: memory-mapped window of the stored CT and mask   {1e3 * t_ours:7.2f} ms")
    print(f"  copy of the same windows out of volumes in RAM         {1e3 * t_copy:7.2f} ms   ours / copy   = {t_ours / t_copy:.2f}")
    print(f"  contiguous memcpy of as many bytes                     {1e3 * t_memcpy:7.2f} ms   ours / memcpy = {t_ours / t_memcpy:.2f}")
    print(f"  naive: nib.load(.nii.gz).get_fdata(), crop, float      {1e3 * t_naive:7.2f} ms   naive / ours  = {t_naive / t_ours:.0f}")
    return {"ours_over_copy": t_ours / t_copy, "ours_over_memcpy": t_ours / t_memcpy, "naive_over_ours": t_naive / t_ours}


def train_step(model, optimizer, x, labels, mask, seg):
    info = {"task": "multilabel"}
    if seg:
        logits, seg_logits = model(x)
        loss = train.classification_loss(logits, labels, info) + train.segmentation_loss(seg_logits, mask, "ce")
    else:
        loss = train.classification_loss(model(x), labels, info)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_seg_overhead(repeats, crop=(32, 64, 64), batch=2):
    print(f"segmentation branch on CPU, crop {crop}, batch {batch}, medians of {repeats} interleaved steps:")
    x, labels = torch.randn(batch, 1, *crop), torch.randint(0, 2, (batch, 18)).float()
    mask = torch.randint(0, 7, (batch, *crop))
    results = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        plain = CTClassifier(arch, 18, crop).train()
        seg = CTClassifier(arch, 18, crop, seg_classes=7).train()
        seg.load_state_dict(plain.state_dict(), strict=False)  # same backbone and head weights
        opt_plain, opt_seg = (torch.optim.AdamW(m.parameters(), 1e-5) for m in (plain, seg))
        t_plain, t_seg = interleaved([lambda: train_step(plain, opt_plain, x, labels, mask, False),
                                      lambda: train_step(seg, opt_seg, x, labels, mask, True)], repeats)
        plain.eval(), seg.eval()
        with torch.no_grad():
            i_plain, i_seg = interleaved([lambda: plain(x), lambda: seg(x)], repeats)
        results[arch] = {"train_step_ratio": t_seg / t_plain, "inference_ratio": i_seg / i_plain}
        print(f"  {arch:5s} train step w/ seg {t_seg:.3f} s / w/o {t_plain:.3f} s = {t_seg / t_plain:.3f}   "
              f"inference of the seg-trained model / plain = {i_seg / i_plain:.3f}")
    return results


def bench_gpu(steps, device, archs, tiny=False):
    """Samples/s and peak memory per model w/ and w/o seg at Table 4 batch sizes, chest crop, bf16."""
    crop = (32, 48, 48) if tiny else data.REGIONS["chest"]["crop"]
    print(f"{device}: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, crop {crop}, bf16 autocast")
    print(f"  {'model':6s} {'batch':>5s} {'seg':>4s} {'samples/s':>10s} {'peak GiB':>9s}")
    for arch in archs:
        batch = 2 if tiny else train.TABLE4_BATCH[("chest", arch)]
        rows = {}
        for seg in (False, True):
            torch.manual_seed(0)
            model = CTClassifier(arch, 18, crop, seg_classes=7 if seg else 0).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), 1e-5)
            ct = torch.randint(-1000, 1000, (batch, 1, *crop), dtype=torch.int16, device=device)
            labels = torch.randint(0, 2, (batch, 18), device=device).float()
            mask = torch.randint(0, 7, (batch, *crop), device=device)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(steps + 2):
                start = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16):
                    train_step(model, optimizer, data.normalize(ct, (-1000, 200)), labels, mask, seg)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
            rows[seg] = (batch / statistics.median(times[2:]), peak)
            print(f"  {arch:6s} {batch:5d} {'w/' if seg else 'w/o':>4s} {rows[seg][0]:10.2f} {peak:9.2f}")
            del model, optimizer
        print(f"  {arch:6s} seg / plain: step time {rows[False][0] / rows[True][0]:.3f}, "
              f"peak memory {rows[True][1] / rows[False][1]:.3f}")


def bench_data_wait(device, steps, workers, tiny=False):
    """Fraction of a training step spent waiting for the next batch, real DataLoader over stored volumes."""
    region = data.REGIONS["chest"]
    crop = (32, 48, 48) if tiny else region["crop"]
    batch = 2 if tiny else train.TABLE4_BATCH[("chest", "r3d")]
    with tempfile.TemporaryDirectory() as folder:
        cases = [f"case{i}" for i in range(8)]
        write_case(folder, (40, 60, 60) if tiny else (120, 240, 240))
        for case in cases:
            for sub in ("ct", "mask"):
                os.link(os.path.join(folder, sub, "case.nii"), os.path.join(folder, sub, f"{case}.nii"))
        dataset = data.CTDataset(cases, data.StoredVolumes(folder, cases, True), np.zeros((8, 18)),
                                 region["pad"] if not tiny else (40, 60, 60), crop, train=True, with_mask=True)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (steps + 2))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                             pin_memory=device == "cuda", persistent_workers=workers > 0)
        model = CTClassifier("r3d", 18, crop, seg_classes=7).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), 1e-5)
        wait = total = 0.0
        start = time.perf_counter()
        for step, sample in enumerate(loader):
            got = time.perf_counter()
            ct = sample["ct"].to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                train_step(model, optimizer, data.normalize(ct, region["window"]), sample["label"].to(device).float(),
                           sample["mask"].to(device).long(), True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                wait, total = wait + got - start, total + time.perf_counter() - start
            start = time.perf_counter()
    print(f"  data wait: {100 * wait / total:.1f}% of step time (r3d w/ seg, batch {batch}, {workers} workers)")
    return wait / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark at the paper's sizes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes (checks the GPU code path on a CPU)")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    if args.gpu:
        bench_gpu(args.repeats, args.device, ARCHS, args.tiny)
        bench_data_wait(args.device, args.repeats, args.workers, args.tiny)
        return
    bench_data_path(args.repeats)
    bench_seg_overhead(max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
