"""``model_stock`` (arXiv 2403.19522, as mergekit 0.1.5 computes it): per tensor, the mean cosine
c of the pairs of task vectors sets t = K·c / (1 + (K − 1)·c) (0 where the denominator vanishes),
and θ̄ = t·mean_k θ_k + (1 − t)·θ0: the plain mean (the method defines it so; the branch weights
take no part), pulled toward θ0 where the branches disagree.

The cosines need the whole tensor: one extra read of it (``statistics``), piece by piece.
"""

from __future__ import annotations

import itertools

import torch

from merit.merge.errors import MergeError
from merit.merge.methods import METHODS, MergeMethod
from merit.merge.methods.sparsify import pieces


def _check(weights: tuple[float, ...], _params) -> None:
    if len(weights) < 2:
        raise MergeError("model_stock needs at least 2 checkpoints besides θ0")


def _interpolation(theta0, thetas, _weights, _params) -> float:
    """t of the tensor, from the pairwise dot products and norms of its task vectors."""
    k = len(thetas)
    dots = torch.zeros(k, k, dtype=torch.float64)
    for start, stop in pieces(theta0.numel()):
        base = theta0[start:stop].to(torch.float32)
        deltas = torch.stack([t[start:stop].to(torch.float32) - base for t in thetas])
        dots += (deltas @ deltas.T).to(torch.float64)
    norms = dots.diagonal().sqrt()
    cosines = [
        float((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
        for i, j in itertools.combinations(range(k), 2)
    ]
    c = sum(cosines) / len(cosines)
    denominator = 1 + (k - 1) * c
    return 0.0 if abs(denominator) < 1e-6 else k * c / denominator


def _merge(theta0, thetas, _weights, _params, t: float):
    average = torch.stack(thetas).sum(0).div_(len(thetas))
    return average.mul_(t).add_(theta0, alpha=1 - t)


METHODS.register(
    MergeMethod(
        name="model_stock",
        formula="θ̄ = t·mean_k θ_k + (1 − t)·θ0, t = K·c/(1 + (K−1)·c), c = mean cos(δ_i, δ_j)",
        help="Model Stock: the mean pulled toward θ0 by the task vectors' agreement; "
        "needs --base θ0 and K ≥ 2",
        needs_base=True,
        check=_check,
        merge=_merge,
        statistics=_interpolation,
        order=6,
    )
)
