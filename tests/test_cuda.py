"""CUDA checks (`python -m pytest -m cuda`), run by bench/gpu_run.sh on a GPU; skipped without one.

With REHEARSE_CUDA_ON_CPU=1 (bench/gpu_run.sh --smoke, tests/test_gpu_run.py) the same tests run on the CPU
at the same tiny sizes, so that they cannot rot between device runs; NCCL DDP needs two GPUs either way.
Tolerances: bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); a loss over thousands of terms under
bf16 autocast lands within 2 % of fp32 here; fp32-vs-fp32 comparisons (chunked vs plain seg loss) within 1e-5.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import model as M
from ctkit import ct_io
from helpers import train_cli

ROOT = Path(__file__).resolve().parents[1]
REHEARSAL = os.environ.get("REHEARSE_CUDA_ON_CPU") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSAL), reason="no CUDA device"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_REL = 2e-2


def small_batch(task, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct = torch.randint(-1000, 1000, (batch, 1, *task.crop), generator=g, dtype=torch.int16)
    labels = torch.randint(0, 2, (batch, len(task.classes)), generator=g).float()
    mask = torch.randint(0, len(task.structures) + 1, (batch, *task.crop), generator=g, dtype=torch.uint8)
    return ct_io.normalize(ct.to(DEVICE), task.window), labels.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("arch", M.ARCHS)
def test_objective_under_bf16_autocast_matches_fp32(arch):
    torch.manual_seed(0)
    task = data.make_task("ctrate", crop=(16, 32, 32))
    net = M.build_model(arch, task, seg=True).to(DEVICE).eval()  # eval: no dropout / stochastic depth
    x, labels, mask = small_batch(task)
    with torch.no_grad():
        objective = M.Objective(net, task.kind)
        fp32 = objective(x, labels, mask)
        with torch.autocast(DEVICE, torch.bfloat16):
            bf16 = objective(x, labels, mask)
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32  # both losses are computed in fp32 from bf16 logits
        assert torch.isfinite(b) and abs(float(a) - float(b)) <= BF16_REL * abs(float(a)), (a, b)


@pytest.mark.parametrize("chunk", [1, 5])
def test_seg_chunk_equals_the_plain_loss(chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 2, 3, 3, device=DEVICE, requires_grad=True)
    mask = torch.randint(0, 7, (2, 24, 40, 40), device=DEVICE)
    plain = M.segmentation_loss(logits, mask)
    (g_plain,) = torch.autograd.grad(plain, logits)
    chunked = M.segmentation_loss(logits, mask, chunk)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-4, atol=1e-7)


def test_ratic_loss_under_autocast():
    torch.manual_seed(0)
    task = data.make_task("ratic", crop=(16, 32, 32))
    net = M.build_model("r3d", task).to(DEVICE).eval()
    x, _, _ = small_batch(task)
    labels = torch.zeros(2, len(task.classes), device=DEVICE)
    columns = list(task.classes)
    for row, healthy in enumerate((True, False)):  # one healthy patient, one with a high-grade liver injury
        for name in ("bowel_healthy", "extravasation_healthy", "kidney_healthy", "spleen_healthy"):
            labels[row, columns.index(name)] = 1
        labels[row, columns.index("liver_healthy" if healthy else "liver_high")] = 1
        labels[row, columns.index("any_injury")] = 0 if healthy else 1
    with torch.no_grad():
        fp32 = M.classification_loss(net(x), labels, "ratic")
        with torch.autocast(DEVICE, torch.bfloat16):
            bf16 = M.classification_loss(net(x), labels, "ratic")
    assert torch.isfinite(bf16) and abs(float(fp32) - float(bf16)) <= BF16_REL * abs(float(fp32))


def test_a_training_run_with_pinned_memory_and_workers(tmp_path):
    """train.py on the device: pinned host memory (CUDA only), non_blocking copies, 2 workers, bf16, --seg.
    The CPU rehearsal trains in fp32 on every CPU (bf16 training on a CPU: tests/test_precision.py)."""
    amp = ["--amp"] if DEVICE == "cuda" else []
    flags = "--seg --channels-last --synthetic-cases 6 2 3 -b 2 -j 2 --epochs 1 --max-steps 2".split()
    train_cli("--device", DEVICE, *amp, *flags, "--output-dir", tmp_path)
    rows = (tmp_path / "iterations.csv").read_text().splitlines()
    assert len(rows) == 3 and all("nan" not in r and "inf" not in r for r in rows)
    assert (tmp_path / "seg_report_test.json").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two GPUs")
def test_torchrun_two_gpus_nccl(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = "--seg --amp --synthetic-cases 8 3 5 --epochs 1 -b 2 -j 1 --device cuda".split()
    result = subprocess.run(
        [*torchrun, "train.py", *args, "--output-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es) x batch 2 = 4" in result.stdout
    assert len((tmp_path / "predictions_test.csv").read_text().splitlines()) == 1 + 5
