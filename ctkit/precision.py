"""Mixed precision (--amp): the autocast dtype of a device; whether this CPU's bf16 3D convolutions are right.

On some x86 CPUs (seen on an AMD EPYC with AVX512-BF16 and no AMX, torch 2.14.1) oneDNN's bf16 weight gradient
of a 3D convolution with many channels on a small feature map is wrong at every call: a relative error near 1,
or inf, against fp32 (R3D-18's layer4), while the output and the input gradient are right. Gradient clipping
turns a finite wrong gradient into an ordinary-looking step, so a run would train on it without a word.
`bf16_fault` is a known-answer check, run once per process before a CPU run uses bf16: convolutions of that
kind under bf16 autocast against fp32, in both memory formats. Routing them around oneDNN gives right bf16
gradients but is far slower than fp32 (docs/performance.md), so where the check fails a run refuses --amp and
trains in fp32. CUDA is not checked: bf16 there goes through cuDNN, not oneDNN.
"""

import functools
import itertools
import platform

import torch
import torch.nn.functional as F

# (in channels, out channels, input (N, D, H, W)) of a 3 x 3 x 3 convolution: R3D-18's deep layers at a small
# crop, where the fault shows (a 64-channel 16 x 32 x 32 map is right on the same CPU)
PROBES = ((128, 128, (2, 2, 3, 3)), (256, 512, (2, 2, 3, 3)), (512, 512, (2, 2, 3, 3)))
SEEDS = (0, 1)  # each probe twice, with other numbers: a fault that comes and goes is still caught
TOLERANCE = 0.05  # relative error; bf16 rounding gives about 0.004 on these shapes


def amp_dtype(device):
    """bf16 autocast (the paper's mixed precision); fp16 with loss scaling on GPUs without bf16."""
    cuda = torch.device(device).type == "cuda"
    return torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16


def device_name(device="cpu"):
    """The GPU's or the CPU's model name (/proc/cpuinfo on Linux), for messages and benchmark headers."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def conv3d_errors(c_in, c_out, shape, channels_last, seed):
    """Relative errors of a 3 x 3 x 3 convolution's (output, input gradient, weight gradient) under bf16
    autocast against fp32, for the loss mean(y^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], c_in, *shape[1:], generator=g)  # (N, C, D, H, W)
    w = torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w))
    results = []
    for amp in (False, True):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y = F.conv3d(x_, w_, padding=1)
        y.float().square().mean().backward()
        results.append((y.detach().float(), x_.grad, w_.grad))
    return [float((b.float() - a).norm() / a.norm()) for a, b in zip(*results)]


@functools.cache
def bf16_fault(device_type):
    """None where bf16 autocast trains right on this device type ("cpu", "cuda"), else one line saying what
    the known-answer check found (computed once per process)."""
    if device_type != "cpu":
        return None
    for (c_in, c_out, shape), channels_last, seed in itertools.product(PROBES, (False, True), SEEDS):
        errors = conv3d_errors(c_in, c_out, shape, channels_last, seed)
        for what, error in zip(("output", "input gradient", "weight gradient"), errors):
            if not error <= TOLERANCE:  # nan and inf included
                layout, machine = "channels-last" if channels_last else "contiguous", device_name()
                return (
                    f"bf16 3D convolutions are wrong on this CPU ({machine}, torch {torch.__version__}):"
                    f" the {what} of a {c_in} -> {c_out} channel convolution on a {layout} {shape[1:]} map"
                    f" is off by {error:.3g} against fp32 (tolerance {TOLERANCE}; bf16 rounding: 0.004)"
                )
    return None
