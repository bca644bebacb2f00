"""Learned merge coefficients: layer groups, the exact gradient in λ, early-stopped fitting."""

from __future__ import annotations

import torch

from merit.diagnose.coefficients import Coefficients, fit_coefficients, layer_groups
from merit.diagnose.premises import Objective


class Layered(torch.nn.Module):
    """Parameters named like a transformer's; the loss is a quadratic in all of them."""

    def __init__(self, target: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        # Parameter lists, so that the flat order is the order of definition.
        self.embed_tokens = torch.nn.ParameterList([torch.zeros(3, dtype=torch.float64)])
        self.layers = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(4)]
        )
        self.norm = torch.nn.ParameterList([torch.zeros(2, dtype=torch.float64)])
        self.register_buffer("target", target)
        self.register_buffer("weight", weight)


def _loss(m: Layered, _batch) -> tuple[torch.Tensor, int]:
    theta = torch.cat([*m.embed_tokens, *m.layers, *m.norm])
    return (m.weight * (theta - m.target) ** 2).sum(), 1


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 3 + 16 + 2
    target = torch.randn(n, generator=g, dtype=torch.float64)
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    obj = Objective(Layered(target, weight), [None], _loss)
    theta0 = obj.vector()
    # Two task vectors that each move part of the way to the target, plus noise.
    deltas = [0.4 * target + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
              for _ in range(2)]  # fmt: skip
    labels = layer_groups(obj.names, 2)
    space = Coefficients(theta0, deltas, obj.names, [p.numel() for p in obj.params], labels)
    return obj, space


def test_layer_groups_cut_the_blocks_into_contiguous_groups():
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.w" for i in range(5)],
             "model.norm.weight", "lm_head.weight"]  # fmt: skip
    assert layer_groups(names, 2) == [
        "embeddings", "blocks 0-2", "blocks 0-2", "blocks 0-2", "blocks 3-4", "blocks 3-4",
        "other", "other",
    ]  # fmt: skip
    assert len(set(layer_groups(names, 99))) == 5 + 2


def test_the_gradient_in_lambda_is_autograds():
    obj, space = _setup()
    lam = torch.tensor([[0.3, 0.5, -0.2, 0.1], [0.7, 0.2, 0.4, 1.1]], dtype=torch.float64)
    mine = space.grad(obj.grad(space.theta(lam)))
    ref_lam = lam.clone().requires_grad_(True)
    theta = space.theta0.clone()
    for s, e, g in space.slices:
        theta = theta.index_add(0, torch.arange(s, e), sum(ref_lam[k, g] * d[s:e]
                                for k, d in enumerate(space.deltas)))  # fmt: skip
    m = obj.module
    loss = (m.weight * (theta - m.target) ** 2).sum()
    (ref,) = torch.autograd.grad(loss, ref_lam)
    assert space.groups == ["embeddings", "blocks 0-1", "blocks 2-3", "other"]
    assert torch.allclose(mine, ref, atol=1e-10)


def test_fitting_lowers_the_stopping_loss_and_never_returns_worse_than_its_start():
    obj, space = _setup()
    init = torch.full((2, len(space.groups)), 0.5, dtype=torch.float64)
    fit = fit_coefficients(obj, obj, space, init, steps=60, lr=0.05, patience=60)
    assert fit.best_loss < 0.8 * fit.start_loss
    assert fit.best_loss == min(h["stop_loss"] for h in fit.history)
    assert set(fit.by_group()) == set(space.groups)
    # A learning rate that diverges: the starting point is kept.
    bad = fit_coefficients(obj, obj, space, init, steps=5, lr=50.0, patience=2)
    assert bad.best_loss <= bad.start_loss
    assert bad.best_step == 0 or bad.best_loss < bad.start_loss
