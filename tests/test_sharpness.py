"""sharpness.py on models whose Hessian is explicit: a linear model under a squared loss."""

import numpy as np
import pytest
import torch

import sharpness


def squared_loss(logits, labels, kind):
    """0.5 * sum of squared errors / cases: for logits = x W^T its Hessian in each row of W is X^T X / N."""
    return 0.5 * ((logits - labels) ** 2).sum() / len(logits)


@pytest.fixture
def linear_problem(monkeypatch):
    monkeypatch.setattr(sharpness, "classification_loss", squared_loss)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(12, 4)) * [3.0, 1.5, 1.0, 0.5])  # distinct eigenvalues: a clear gap
    y = torch.tensor(rng.normal(size=(12, 2)))
    model = torch.nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():  # the least-squares solution: the gradient is zero there
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # two batches of different sizes
    return model, batches, x, y


def test_power_iteration_finds_the_largest_hessian_eigenvalue(linear_problem):
    model, batches, x, _ = linear_problem
    expected = np.linalg.eigvalsh((x.T @ x).numpy() / len(x)).max()
    value, estimates = sharpness.max_eigenvalue(model, [model.weight], batches, "multilabel", iterations=60)
    assert value == pytest.approx(expected, rel=1e-6) and len(estimates) == 60
    hv = sharpness.hessian_vector_product(
        model, [model.weight], batches, "multilabel", [torch.eye(2, 4).double()]
    )
    np.testing.assert_allclose(
        hv[0].numpy(), (torch.eye(2, 4).double() @ (x.T @ x) / len(x)).numpy(), rtol=1e-10
    )


def test_filter_normalised_directions(linear_problem):
    model, _, _, _ = linear_problem
    bias = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    weight_direction, bias_direction = sharpness.filter_normalized_direction(
        [model.weight, bias], torch.Generator().manual_seed(3)
    )
    np.testing.assert_allclose(
        weight_direction.norm(dim=1).numpy(), model.weight.detach().norm(dim=1).numpy()
    )
    assert not bias_direction.any()  # biases and norm parameters stay where they are


def test_loss_increase_at_a_minimum_is_half_the_curvature_along_the_direction(linear_problem):
    """At the least-squares solution L(W + a D) - L(W) = a^2 / 2 * |X D^T|^2 / N exactly."""
    model, batches, x, _ = linear_problem
    alpha, draws = 0.05, 4
    mean, each = sharpness.perturbation_increase(
        model, [model.weight], batches, "multilabel", alpha, draws, seed=7
    )
    generator = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(draws):
        (direction,) = sharpness.filter_normalized_direction([model.weight], generator)
        expected.append(0.5 * alpha**2 * float(((x @ direction.T) ** 2).sum()) / len(x))
    np.testing.assert_allclose(each, expected, rtol=1e-8)
    assert mean == pytest.approx(np.mean(expected))
    assert all(v > 0 for v in each)


def test_measure_a_trained_run(tmp_path):
    """The command's path: a run folder's checkpoint, its first training phantoms, both measures saved."""
    from helpers import train_cli

    train_cli(
        *"--synthetic-cases 6 2 3 --crop 16 32 32 -b 2 -j 0 --epochs 1 --seg".split(),
        "--output-dir",
        tmp_path,
    )
    result = sharpness.measure(tmp_path, cases=4, batch_size=2, iterations=3, draws=2)
    assert result["checkpoint"] == "checkpoint_best.pth" and result["cases"] == 4
    assert len(result["power_iterations"]) == 3 and np.isfinite(result["lambda_max"])
    assert len(result["increases_0.05"]) == 2 and (tmp_path / "sharpness.json").exists()
