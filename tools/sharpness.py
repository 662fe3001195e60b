"""Sharpness of a trained checkpoint, measured on the classification loss (beyond the paper: a direct test of
§3.4's "segmentation supervision ... guides optimization towards flatter minima").

Both measures use only the classification loss, the objective both arms share, on a fixed set of training
batches (the first cases of the training split, centre crops, BatchNorm in eval mode), over every parameter
except the seg head (which that loss does not depend on):
  lambda_max   the largest Hessian eigenvalue, by power iteration with Hessian-vector products (double
               backward): v <- Hv / |Hv|, lambda = v.Hv;
  increase(a)  the mean of L(theta + a d) - L(theta) over random directions d, each filter-normalised as in
               Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets"): every filter (output channel)
               of d scaled to the norm of that filter of theta; biases and norm parameters not perturbed.

    python tools/sharpness.py runs/study/*/   # writes sharpness.json in each run folder and prints a table
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

# a script of this folder stands on the top level
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from ctkit import ct_io, synthetic, utils  # noqa: E402
from model import build_model, classification_loss  # noqa: E402


def loss_on(model, batches, kind):
    """Mean classification loss over fixed (x, labels) batches, weighted by their sizes."""
    total = sum(len(x) for x, _ in batches)
    return sum(classification_loss(model(x), y, kind) * len(x) / total for x, y in batches)


def hessian_vector_product(model, params, batches, kind, vector):
    """H v for the classification loss, one batch at a time (double backward)."""
    product = [torch.zeros_like(p) for p in params]
    total = sum(len(x) for x, _ in batches)
    for x, y in batches:
        loss = classification_loss(model(x), y, kind) * len(x) / total
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        for p, hv in zip(product, torch.autograd.grad(dot, params)):
            p += hv
    return product


def max_eigenvalue(model, params, batches, kind, iterations=20, seed=0):
    """The largest-magnitude Hessian eigenvalue by power iteration; (value, estimates per iteration)."""
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    estimates = []
    for _ in range(iterations):
        norm = torch.sqrt(sum((v**2).sum() for v in vector))
        vector = [v / norm for v in vector]
        product = hessian_vector_product(model, params, batches, kind, vector)
        estimates.append(float(sum((v * h).sum() for v, h in zip(vector, product))))
        vector = [h.detach() for h in product]
    return estimates[-1], estimates


def filter_normalized_direction(params, generator):
    """A random direction with each filter's norm equal to that filter's norm in params (Li et al. 2018);
    1-D parameters (biases, norms) are left unperturbed."""
    direction = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            d_norm = d.flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1))
            p_norm = p.detach().flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1))
            d = d / (d_norm + 1e-10) * p_norm
        direction.append(d)
    return direction


@torch.no_grad()
def perturbation_increase(model, params, batches, kind, alpha, draws=8, seed=0):
    """Mean (and each) L(theta + alpha d) - L(theta) over `draws` filter-normalised directions d."""
    generator = torch.Generator().manual_seed(seed)
    base, increases = float(loss_on(model, batches, kind)), []
    for _ in range(draws):
        direction = filter_normalized_direction(params, generator)
        for p, d in zip(params, direction):
            p += alpha * d
        increases.append(float(loss_on(model, batches, kind)) - base)
        for p, d in zip(params, direction):
            p -= alpha * d
    return float(np.mean(increases)), increases


def fixed_batches(config, cases, batch_size, run_folder="."):
    """The first `cases` training cases of a run's dataset, centre-cropped and normalised, in batches."""
    task = data.Task.from_dict(config["task"])
    if config["dataset"] == "synthetic" and not config.get("data_path"):  # the same phantoms, made again
        variant = config["synthetic_variant"]
        ids, volumes, labels = synthetic.synthetic_split("train", cases, pad=task.pad, variant=variant)
        dataset = data.CTDataset(ids, volumes, labels, task.pad, task.crop, train=False)
    else:  # the run's own cases; the crops only: no masks are needed
        source = data.Source.of_run(config, run_folder)
        train = data.build_datasets(task, source, config["seed"], with_mask=False)["train"]
        dataset = data.CTDataset(
            train.case_ids, train.volumes, train.labels, task.pad, task.crop, train=False
        )
    samples = [dataset[i] for i in range(min(cases, len(dataset)))]
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = torch.utils.data.default_collate(samples[start : start + batch_size])
        batches.append((ct_io.normalize(batch["ct"], task.window), batch["label"]))
    return batches, task


def measure(run_folder, cases=20, batch_size=10, iterations=20, alphas=(0.02, 0.05), draws=8):
    """Both measures for a run's evaluated checkpoint (best on validation if there is one); sharpness.json."""
    config = utils.read_json(os.path.join(run_folder, "config.json"))
    best = os.path.exists(os.path.join(run_folder, "checkpoint_best.pth"))
    name = "checkpoint_best.pth" if best else "checkpoint.pth"
    state = utils.load_checkpoint(os.path.join(run_folder, name))
    batches, task = fixed_batches(config, cases, batch_size, run_folder)
    model = build_model(config["model"], task, config["seg"])
    model.load_state_dict(state["model"])
    model.eval()  # BatchNorm with its running statistics: the same function for every measurement
    params = [p for n, p in model.named_parameters() if not n.startswith("seg_head.")]
    lam, estimates = max_eigenvalue(model, params, batches, task.kind, iterations)
    loss = float(loss_on(model, batches, task.kind).detach())
    result = {
        "checkpoint": name,
        "cases": sum(len(x) for x, _ in batches),
        "loss": loss,
        "lambda_max": lam,
        "power_iterations": estimates,
    }
    for alpha in alphas:
        mean, each = perturbation_increase(model, params, batches, task.kind, alpha, draws)
        result[f"increase_{alpha:g}"], result[f"increases_{alpha:g}"] = mean, each
    utils.write_json(os.path.join(run_folder, "sharpness.json"), result)
    return result


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--cases", type=int, default=20, help="fixed training cases")
    parser.add_argument("--iterations", type=int, default=20, help="power iterations")
    parser.add_argument("--draws", type=int, default=8, help="random directions per perturbation size")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.02, 0.05], help="perturbation sizes")
    return parser


def main(args):
    torch.manual_seed(0)
    for run in args.runs:
        r = measure(run, args.cases, iterations=max(2, args.iterations), alphas=args.alphas, draws=args.draws)
        change = abs(r["power_iterations"][-1] - r["power_iterations"][-2]) / max(abs(r["lambda_max"]), 1e-12)
        increases = "  ".join(f"increase({a:g}) {r[f'increase_{a:g}']:.4g}" for a in args.alphas)
        print(
            f"{run}: loss {r['loss']:.4f}  lambda_max {r['lambda_max']:.4g} (the last iteration changed it "
            f"by {100 * change:.2f}%)  {increases}"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
