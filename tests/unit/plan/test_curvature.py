"""Hessian-vector-product predictions against a model whose loss is exactly quadratic."""

import numpy as np
import pytest
import torch

from merit.plan.curvature import curvature, gradient, hessian_vector_products
from merit.plan.splitters import gain_hessian, joint_loss, merged_loss


class Quadratic(torch.nn.Module):
    """Least squares per dataset: L_t(W) = |X_t Wᵀ − Y_t|² / (2 n_t), exactly quadratic in W."""

    def __init__(self, n_in=5, n_out=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(n_out, generator=g, dtype=torch.float64))

    def loss(self, x, y):
        return ((x @ self.w.T + self.b - y) ** 2).sum() / (2 * len(x))


def _problem(t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Quadratic()
    data = []
    for i in range(t):
        x = torch.randn(8 + i, 5, generator=g, dtype=torch.float64) * (1 + 0.3 * i)
        y = torch.randn(8 + i, 3, generator=g, dtype=torch.float64) + i % 3
        data.append((x, y))
    tokens = np.array([10.0, 30, 20, 40, 25, 15])[:t]
    return model, data, tokens


def _terms(model, data):
    return [[lambda x=x, y=y: model.loss(x, y)] for x, y in data]


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _set_flat(model, vec):
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vec[i : i + p.numel()].reshape(p.shape))
            i += p.numel()


def _mixture_loss(model, data, pi, theta):
    _set_flat(model, theta)
    with torch.no_grad():
        return sum(float(p) * float(model.loss(x, y)) for p, (x, y) in zip(pi, data))


def _at_theta0(model, data, tokens):
    """Parameters, loss terms, mixture weights π, θ0, per-dataset gradients, L(θ0) and ḡ at θ0."""
    params = list(model.parameters())
    terms = _terms(model, data)
    pi = tokens / tokens.sum()
    theta0 = _flat_params(model).clone()
    est = torch.stack([gradient(params, tm)[1].double() for tm in terms])
    loss0 = _mixture_loss(model, data, pi, theta0)
    _set_flat(model, theta0)
    gh = sum(float(p) * est[t] for t, p in enumerate(pi))
    return params, terms, pi, theta0, est, loss0, gh


def test_hvp_equals_explicit_hessian():
    model, data, _ = _problem()
    params = list(model.parameters())
    x, y = data[0]
    theta = _flat_params(model).clone().requires_grad_(True)

    def f(th):
        w, b = th[:15].reshape(3, 5), th[15:]
        return ((x @ w.T + b - y) ** 2).sum() / (2 * len(x))

    hess = torch.autograd.functional.hessian(f, theta)
    v = torch.randn(2, theta.numel(), dtype=torch.float64)
    hv = hessian_vector_products(params, _terms(model, data)[0], v)
    torch.testing.assert_close(hv, v @ hess, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], [1, 0, 2, 2, 0, 1]])
def test_hvp_gain_equals_quadratic_loss_difference(groups):
    """Σ_k w_k L(θ_k) − L(θ̄) with θ_k = θ0 − η ḡ_k, computed directly, equals the HVP formula
    ½ η² Σ_k w_k (ḡ_k − ḡ)ᵀ H (ḡ_k − ḡ) to numerical precision (the loss is exactly quadratic)."""
    model, data, tokens = _problem()
    groups = np.array(groups)
    k = groups.max() + 1
    params, terms, pi, theta0, est, loss0, gh = _at_theta0(model, data, tokens)
    # The same partition under other labels is the same candidate.
    relabeled = (groups + 1) % k
    cur = curvature(params, est, gh, loss0, terms, tokens, [groups, relabeled], int(k))
    assert cur.quad[0] == cur.quad[1] and cur.cross[0] == cur.cross[1]
    eta = 0.37
    w = np.bincount(groups, weights=tokens, minlength=k) / tokens.sum()
    means = [
        sum(tokens[t] * est[t] for t in np.flatnonzero(groups == j)) / tokens[groups == j].sum()
        for j in range(k)
    ]
    thetas = [theta0 - eta * m for m in means]
    merged = sum(float(w[j]) * thetas[j] for j in range(k))
    direct = sum(w[j] * _mixture_loss(model, data, pi, thetas[j]) for j in range(k))
    direct -= _mixture_loss(model, data, pi, merged)
    assert direct > 0
    assert gain_hessian(cur, 0, eta) == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_merged_loss_prediction_is_second_order_exact():
    """With branch displacements δ_k = −τ ḡ_k + ½ τ² H_k ḡ_k (gradient flow to 2nd order), the
    predicted L(θ̄) errs by O(τ³): halving τ divides the error by about 8."""
    model, data, tokens = _problem()
    groups = np.array([0, 0, 1, 1, 2, 2])
    k = 3
    params, terms, pi, theta0, est, loss0, gh = _at_theta0(model, data, tokens)
    cur = curvature(params, est, gh, loss0, terms, tokens, [groups], k)
    w = np.bincount(groups, weights=tokens, minlength=k) / tokens.sum()
    errors = []
    for tau in (0.02, 0.01):
        deltas = []
        for j in range(k):
            idx = np.flatnonzero(groups == j)
            a = tokens[idx] / tokens[idx].sum()
            gk = sum(a[i] * est[t] for i, t in enumerate(idx))
            hk = sum(
                a[i] * hessian_vector_products(params, terms[t], gk[None])[0]
                for i, t in enumerate(idx)
            )
            deltas.append(-tau * gk + 0.5 * tau**2 * hk)
        merged = theta0 + sum(float(w[j]) * deltas[j] for j in range(k))
        exact = _mixture_loss(model, data, pi, merged)
        _set_flat(model, theta0)
        errors.append(abs(merged_loss(cur, 0, tau) - exact))
        assert merged_loss(cur, 0, tau) < loss0
    assert errors[1] < errors[0] / 6
    # A one-group "plan" is joint training: the same prediction as joint_loss.
    one = curvature(params, est, gh, loss0, terms, tokens, [np.zeros(6, dtype=int)], 1)
    assert merged_loss(one, 0, 0.01) == pytest.approx(joint_loss(cur, 0.01), rel=1e-12)
