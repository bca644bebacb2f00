"""``regmean`` (arXiv 2212.09849): each linear layer's weight is the one whose outputs best match
every branch's on that branch's own inputs, W* = argmin Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖², in closed form

    W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹,   G̃_k = w_k·(a·G_k + (1 − a)·diag G_k),

with G_k = mean over branch k's training tokens of x xᵀ (x the layer's input, so W is stored
[out, in] as torch does) and a the off-diagonal ratio (a = 1: plain RegMean; a = 0: a diagonal,
per-input-feature weighted average). Weighting each Gram by the branch's token share w_k makes
equal Grams give back the token-weighted average, paper eq. 3. Every other tensor (embeddings,
norms, biases) merges by ``task_arithmetic`` with λ = ``scale``.

The registered method is that task-arithmetic fallback; :func:`tensor_method` is one linear
layer's merge from its Grams (:mod:`merit.merge.grams`): a whole-tensor statistic computed in
one read of the K weights, sliced chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from merit.merge.errors import MergeError
from merit.merge.methods import METHODS, MergeMethod, Param
from merit.merge.methods.task_vector import TASK_VECTOR

ALPHA = Param("alpha", 0.9, "a, the weight of the Grams' off-diagonal part, in [0, 1]")


def _check(_weights: tuple[float, ...], params: Mapping[str, float]) -> None:
    if not 0 <= params["alpha"] <= 1:
        raise MergeError(f"alpha must be in [0, 1], got {params['alpha']:g}")


REGMEAN = METHODS.register(
    dataclasses.replace(
        TASK_VECTOR,
        name="regmean",
        formula="W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹ per linear layer; θ0 + λ·Σ_k w_k δ_k elsewhere",
        help="RegMean: linear layers from each branch's input Grams (a run's merge only: "
        "merging.method: regmean); other tensors θ0 + --scale·Σ w_k δ_k",
        params=(*TASK_VECTOR.params, ALPHA),
        check=_check,
        fitted="each branch's own training inputs",
        order=7,
    )
)


def closed_form(
    weights_k: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    shares: Sequence[float],
    alpha: float,
) -> torch.Tensor:
    """W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹ for [out, in] weights and [in, in] Grams, in float64."""
    num, den = None, None
    for w, g, share in zip(weights_k, grams, shares):
        g = g.to(torch.float64)
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        g = share * g
        term = w.to(torch.float64) @ g
        num = term if num is None else num + term
        den = g if den is None else den + g
    # (Σ G̃) is symmetric: W* = num·den⁻¹ solves den·W*ᵀ = numᵀ.
    try:
        return torch.linalg.solve(den, num.T).T
    except RuntimeError:  # singular (an input feature no branch ever saw): least squares
        return torch.linalg.lstsq(den, num.T).solution.T


def tensor_method(shape: tuple[int, int], grams: list[torch.Tensor]) -> MergeMethod:
    """RegMean for one linear layer: the whole W* as the tensor's statistics, sliced per chunk."""

    def statistics(_theta0, thetas, weights, params) -> torch.Tensor:
        ws = [t.reshape(shape) for t in thetas]
        return closed_form(ws, grams, weights, params["alpha"]).to(torch.float32).reshape(-1)

    def merge(_theta0, thetas, _weights, _params, merged, start=0) -> torch.Tensor:
        return merged[start : start + thetas[0].numel()]

    return MergeMethod(
        name="regmean",
        formula=REGMEAN.formula,
        params=REGMEAN.params,
        merge=merge,
        statistics=statistics,
        chunk_offset=True,
    )
