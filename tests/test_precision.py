"""--amp on a CPU: the known-answer check of bf16 3D convolutions (ctkit/precision.py) finds a wrong result
and train.py then refuses --amp in one line, before it writes anything.

The check is exercised on any CPU: PyTorch's own convolution kernels (oneDNN switched off) give right bf16
results everywhere, and a fault is injected into them where a test needs one. The fault itself (oneDNN's bf16
weight gradient) is reproduced where this CPU has it."""

import pytest
import torch
import torch.nn.functional as F

from ctkit import precision
from helpers import train_cli

RUN = ("--synthetic-cases", 4, 2, 2, "--crop", 16, 32, 32, "-b", 2, "-j", 0, "--epochs", 1, "--max-steps", 1)


class Negated(torch.autograd.Function):
    """The identity whose gradient comes back negated: a wrong weight gradient with a right forward pass."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@pytest.fixture
def right_kernels(monkeypatch):
    """PyTorch's reference convolutions (right in bf16 on every CPU, slow: one small probe), a fresh check."""
    monkeypatch.setattr(precision, "PROBES", precision.PROBES[:1])
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    precision.bf16_fault.cache_clear()
    yield
    precision.bf16_fault.cache_clear()


def test_the_check_passes_right_bf16_convolutions(right_kernels):
    assert precision.bf16_fault("cpu") is None
    assert precision.bf16_fault("cuda") is None  # cuDNN's bf16 is not oneDNN's: not checked


@pytest.mark.parametrize("where", ["output", "weight gradient"])
def test_an_injected_bf16_fault_is_found_and_train_refuses_amp(right_kernels, monkeypatch, tmp_path, where):
    right = F.conv3d

    def faulty(x, w, *args, **kwargs):
        y = right(x, w, *args, **kwargs)
        if y.dtype != torch.bfloat16:  # fp32 stays right
            return y
        return 1.5 * y if where == "output" else right(x, Negated.apply(w), *args, **kwargs)

    monkeypatch.setattr(F, "conv3d", faulty)
    fault = precision.bf16_fault("cpu")
    assert f"the {where} of a 128 -> 128 channel convolution" in fault and precision.device_name() in fault
    with pytest.raises(SystemExit) as stop:
        train_cli(*RUN, "--amp", "--output-dir", tmp_path / "run")
    message = str(stop.value)
    assert message.startswith("stopped: --amp: bf16 3D convolutions are wrong on this CPU")
    assert message.endswith("train in fp32: leave out --amp") and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_the_hosts_bf16_weight_gradient_fault_if_it_has_it(tmp_path):
    """The fault as first seen (AMD EPYC, AVX512-BF16, no AMX, torch 2.14.1): R3D-18's layer4 convolution
    under bf16 autocast, its weight gradient against fp32, written out without the check's code."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(512, 512, 3, padding=1, bias=False)
    x = torch.randn(4, 512, 2, 3, 3)
    grads = []
    for amp in (False, True):
        conv.weight.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y = conv(x)
        y.float().square().mean().backward()
        grads.append(conv.weight.grad)
    error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    if error <= precision.TOLERANCE:
        pytest.skip(f"this CPU's oneDNN bf16 weight gradient is right here (off by {error:.2g}): no fault")
    precision.bf16_fault.cache_clear()
    assert "weight gradient" in precision.bf16_fault("cpu")
    with pytest.raises(SystemExit, match="stopped: --amp: bf16 3D convolutions are wrong on this CPU"):
        train_cli(*RUN, "--amp", "--output-dir", tmp_path / "run")
    train_cli(*RUN, "--output-dir", tmp_path / "run")  # fp32 trains
    assert (tmp_path / "run" / "predictions_test.csv").exists()
