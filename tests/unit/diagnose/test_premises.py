"""Diagnostics math on objectives whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit.diagnose.premises import (
    Objective,
    interpolation_curve,
    lanczos,
    merging_gain,
    perturbation_curve,
    relative_sigmas,
)


class Quadratic(torch.nn.Module):
    """L(θ) = ½ (θ − c)ᵀ A (θ − c) + 3 in float64."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(len(c), dtype=torch.float64))
        self.register_buffer("a", a)
        self.register_buffer("c", c)


def quad_loss(m: Quadratic, _batch) -> tuple[torch.Tensor, int]:
    d = m.theta - m.c
    return 0.5 * d @ m.a @ d + 3.0, 1


def quadratic(
    n: int = 10, seed: int = 0, indefinite: bool = False
) -> tuple[Objective, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, 5.0, n, dtype=torch.float64)
    if indefinite:
        lam[:3] = -torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    c = torch.randn(n, generator=g, dtype=torch.float64)
    return Objective(Quadratic(a, c), [None], quad_loss), a


def test_barrier_of_a_quadratic_matches_closed_form():
    for indefinite in (False, True):
        obj, a = quadratic(indefinite=indefinite, seed=1)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(obj.dim, generator=g, dtype=torch.float64)
        y = torch.randn(obj.dim, generator=g, dtype=torch.float64)
        alphas = np.linspace(0, 1, 11)
        curve = interpolation_curve(obj, x, y, alphas)
        assert curve["excess"][0] == 0.0 and curve["excess"][-1] == 0.0
        d = y - x
        # L((1−α)x + αy) − [(1−α)L(x) + αL(y)] = −½ α(1−α) dᵀAd for any quadratic.
        expect = [-0.5 * al * (1 - al) * float(d @ a @ d) for al in alphas]
        np.testing.assert_allclose(curve["excess"], expect, rtol=1e-9, atol=1e-9)
        assert curve["barrier"] == pytest.approx(max(0.0, -0.125 * float(d @ a @ d)), abs=1e-9)
        if indefinite:  # an ascent direction between the two points: a real barrier
            obj2, a2 = obj, a
            e = torch.linalg.eigh(a2).eigenvectors[:, 0]  # most negative curvature
            c2 = interpolation_curve(obj2, x, x + 2 * e, [0, 0.5, 1])
            assert c2["barrier"] > 0
            assert c2["barrier"] == pytest.approx(-0.125 * float(4 * e @ a2 @ e), rel=1e-9)


def test_hvp_predicted_gain_is_exact_for_a_quadratic():
    obj, a = quadratic(n=12, seed=3)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(obj.dim, generator=g, dtype=torch.float64)
    branches = [
        base + 0.7 * torch.randn(obj.dim, generator=g, dtype=torch.float64) for _ in range(3)
    ]
    w = [0.5, 0.3, 0.2]
    gain = merging_gain(obj, base, branches, w, lanczos_iters=obj.dim, top=obj.dim)
    assert gain.measured > 0
    assert gain.predicted == pytest.approx(gain.measured, rel=1e-10)
    # Lanczos to full depth finds the whole spectrum, and the split adds up to the prediction.
    np.testing.assert_allclose(
        sorted(gain.eigenvalues), np.linalg.eigvalsh(a.numpy()), rtol=1e-8, atol=1e-10
    )
    assert sum(gain.eigen_split) == pytest.approx(gain.predicted, rel=1e-8)
    assert gain.as_dict()["rest"] == pytest.approx(0.0, abs=1e-8)


def test_finite_difference_hvp_is_exact_on_a_quadratic_and_close_on_an_mlp():
    obj, a = quadratic(n=8, seed=7)
    g = torch.Generator().manual_seed(8)
    theta = torch.randn(obj.dim, generator=g, dtype=torch.float64)
    v = torch.randn(obj.dim, generator=g, dtype=torch.float64)
    obj.hvp_method = "finite_difference"
    torch.testing.assert_close(obj.hvp(theta, v), a @ v, rtol=1e-9, atol=1e-9)
    mlp, base, branches = _mlp_setup(steps=5, lr=0.05)
    d = branches[0] - base
    exact = mlp.hvp(base, d)
    mlp.hvp_method, mlp.hvp_step = "finite_difference", 1e-3
    fd = mlp.hvp(base, d)
    assert float(torch.linalg.vector_norm(fd - exact) / torch.linalg.vector_norm(exact)) < 1e-4


def test_lanczos_finds_top_eigenvalues_with_few_iterations():
    g = torch.Generator().manual_seed(0)
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([50.0, 30.0, 20.0]), torch.rand(n - 3, generator=g)]).double()
    a = q @ torch.diag(lam) @ q.T
    vals, vecs = lanczos(lambda v: a @ v, n, 25, seed=1, dtype=torch.float64)
    np.testing.assert_allclose(vals[:3], [50.0, 30.0, 20.0], rtol=1e-6)
    assert abs(float(vecs[0] @ q[:, 0])) == pytest.approx(1.0, abs=1e-6)


def _mlp_setup(steps: int, lr: float):
    """A tiny MLP trained from a shared start on two conflicting targets."""
    torch.manual_seed(0)
    n = 256
    x = torch.randn(n, 4, dtype=torch.float64)
    y1 = torch.sin(x[:, :1]) + 0.1 * torch.randn(n, 1, dtype=torch.float64)
    y2 = torch.cos(x[:, 1:2]) + 0.1 * torch.randn(n, 1, dtype=torch.float64)
    mix = torch.where(torch.arange(n)[:, None] % 2 == 0, y1, y2)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()

    def mse(m, b):
        xb, yb = b
        return ((m(xb) - yb) ** 2).sum(), yb.numel()

    def fit(target, k, rate):
        opt = torch.optim.SGD(mlp.parameters(), lr=rate)
        for _ in range(k):
            opt.zero_grad()
            (mse(mlp, (x[:128], target[:128]))[0] / 128).backward()
            opt.step()

    fit(mix, 200, 0.05)  # θ0: fitted to the mixture
    obj = Objective(mlp, [(x[128:], mix[128:])], mse)
    base = obj.vector()
    branches = []
    for target in (y1, y2):
        obj.set(base)
        fit(target, steps, lr)
        branches.append(obj.vector())
    return obj, base, branches


def test_hvp_predicted_gain_within_ten_percent_for_a_tiny_mlp():
    obj, base, branches = _mlp_setup(steps=5, lr=0.05)
    gain = merging_gain(obj, base, branches, [0.6, 0.4], lanczos_iters=10, top=4)
    assert gain.measured > 1e-3  # the branches really diverged
    assert abs(gain.predicted - gain.measured) <= 0.1 * gain.measured
    assert 0 < sum(gain.eigen_split) <= gain.predicted * 1.0001
    assert gain.eigenvalues == sorted(gain.eigenvalues, reverse=True)


def test_perturbation_curve_is_flat_at_zero():
    obj, base, _ = _mlp_setup(steps=1, lr=0.01)
    curve = perturbation_curve(obj, base, [0.0, 1e-3, 1e-2], draws=2, seed=5)
    l0 = obj.loss(base)
    assert curve["mean"][0] == l0 and curve["std"][0] == 0.0
    rise = [m - l0 for m in curve["mean"]]
    assert rise[1] > 0 and rise[2] > 0
    # Flat at σ = 0: the rise is quadratic in σ (10× σ → 100× rise), not linear.
    assert rise[1] / rise[2] == pytest.approx(0.01, rel=0.1)
    # On a quadratic, the antithetic mean is exactly L + ½σ² mean(εᵀAε).
    qobj, a = quadratic(seed=6)
    theta = torch.zeros(qobj.dim, dtype=torch.float64)
    qc = perturbation_curve(qobj, theta, [0.0, 0.3], draws=3, seed=9)
    from merit.diagnose.premises import gaussian_direction

    eps = [gaussian_direction(qobj.dim, 9 + d, dtype=torch.float64) for d in range(3)]
    expect = qobj.loss(theta) + 0.5 * 0.09 * np.mean([float(e @ a @ e) for e in eps])
    assert qc["mean"][1] == pytest.approx(expect, rel=1e-10)


def test_relative_sigmas_give_the_requested_step_length():
    (s,) = relative_sigmas([2.0], step=3.0, dim=40_000)
    eps = torch.randn(40_000, generator=torch.Generator().manual_seed(0))
    assert float(torch.linalg.vector_norm(s * eps)) == pytest.approx(6.0, rel=0.02)
