"""Where the top Hessian eigenvector of sharpness.py lives: the share of its squared norm per parameter tensor
(exploratory, not part of the pre-registered study). Same fixed batches and loss as sharpness.py.

    python docs/study/top_eigenvector.py runs/study/n320_base_s0 runs/study/n320_seg_s1
"""

import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import sharpness  # noqa: E402
from ctkit import utils  # noqa: E402
from model import build_model  # noqa: E402


def top_eigenvector(run, iterations=4, cases=20):
    """(lambda estimate, [(share of squared norm, parameter name)], largest first)."""
    config = utils.read_json(os.path.join(run, "config.json"))
    state = utils.load_checkpoint(os.path.join(run, "checkpoint_best.pth"))
    batches, task = sharpness.fixed_batches(config, cases, 10)
    model = build_model(config["model"], task, config["seg"])
    model.load_state_dict(state["model"])
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("seg_head.")]
    params = [p for _, p in named]
    generator = torch.Generator().manual_seed(0)
    vector = [torch.randn(p.shape, generator=generator) for p in params]
    for _ in range(iterations):
        norm = torch.sqrt(sum((v**2).sum() for v in vector))
        vector = [v / norm for v in vector]
        product = sharpness.hessian_vector_product(model, params, batches, task.kind, vector)
        lam = float(sum((v * h).sum() for v, h in zip(vector, product)))
        vector = [h.detach() for h in product]
    total = float(sum((v**2).sum() for v in vector))
    shares = sorted(((float((v**2).sum()) / total, n) for v, (n, _) in zip(vector, named)), reverse=True)
    return lam, shares


if __name__ == "__main__":
    for run in sys.argv[1:]:
        lam, shares = top_eigenvector(run)
        print(f"{run}: lambda {lam:.0f}; " + ", ".join(f"{n} {s:.3f}" for s, n in shares[:6]))
