"""Learned merge coefficients (AdaMerging-style, arXiv 2310.02575, fitted on labelled validation
examples instead of test-time entropy): θ(λ) = θ0 + Σ_k Σ_g λ_k^g δ_k|_g, one coefficient per
branch k and *layer group* g (embeddings, a few contiguous groups of blocks, the rest), fitted
by Adam on the answer-token loss of part of the validation split, with early stopping on the
other part. Groups, not tensors: a few hundred validation examples cannot fit thousands of
coefficients without overfitting.

The gradient is exact and cheap: ∂L/∂λ_k^g = ⟨∇L(θ(λ))|_g, δ_k|_g⟩, one backward pass per
step. Memory: θ0, the K task vectors, θ(λ) and ∇L, each the model's size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from merit.diagnose.premises import Objective

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_groups(names: Sequence[str], block_groups: int) -> list[str]:
    """A group label per parameter: ``embeddings``, ``blocks i-j`` (the transformer blocks cut
    into ``block_groups`` contiguous groups) or ``other`` (final norm, head, ...)."""
    blocks = [int(m.group(1)) if (m := _BLOCK.search(n)) else None for n in names]
    depth = max((b for b in blocks if b is not None), default=-1) + 1
    per = max(1, -(-depth // max(1, block_groups)))
    out = []
    for name, b in zip(names, blocks):
        if b is not None:
            lo = (b // per) * per
            out.append(f"blocks {lo}-{min(lo + per, depth) - 1}")
        else:
            out.append("embeddings" if "embed" in name else "other")
    return out


@dataclass
class Fit:
    """The fitted coefficients λ[k][g], by group label, and the curve that chose them."""

    groups: list[str]
    coefficients: list[list[float]]  # [branch][group]
    start_loss: float  # the stopping part's loss at the initial coefficients
    best_loss: float  # ... at the chosen ones
    best_step: int
    history: list[dict] = field(default_factory=list)

    def by_group(self) -> dict[str, list[float]]:
        return {g: [row[i] for row in self.coefficients] for i, g in enumerate(self.groups)}


class Coefficients:
    """θ(λ) and ∂L/∂λ for task vectors cut into parameter slices of known groups."""

    def __init__(self, theta0, deltas, names, sizes, labels):
        self.theta0, self.deltas = theta0, deltas
        self.groups = list(dict.fromkeys(labels))
        index = {g: i for i, g in enumerate(self.groups)}
        self.slices, offset = [], 0
        for _name, size, label in zip(names, sizes, labels):
            self.slices.append((offset, offset + size, index[label]))
            offset += size

    def theta(self, lam: torch.Tensor) -> torch.Tensor:
        out = self.theta0.clone()
        for s, e, g in self.slices:
            for k, d in enumerate(self.deltas):
                out[s:e].add_(d[s:e], alpha=float(lam[k, g]))
        return out

    def grad(self, full: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.deltas), len(self.groups), dtype=torch.float64)
        for s, e, g in self.slices:
            for k, d in enumerate(self.deltas):
                out[k, g] += float(torch.dot(full[s:e], d[s:e]))
        return out


def fit_coefficients(
    fit: Objective,
    stop: Objective,
    space: Coefficients,
    init: torch.Tensor,
    steps: int = 20,
    lr: float = 0.01,
    patience: int = 4,
    tick: Callable[[], None] | None = None,
) -> Fit:
    """Adam on λ from ``init`` ([K, G]) over ``fit``'s batches; the λ of lowest ``stop`` loss
    (the initial one included, so the fit never returns worse than its start on ``stop``)."""
    lam = init.clone().to(torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=lr)
    best = (stop.loss(space.theta(lam.detach())), 0, lam.detach().clone())
    start, history, waited = best[0], [{"step": 0, "stop_loss": best[0]}], 0
    for step in range(1, steps + 1):
        lam.grad = space.grad(fit.grad(space.theta(lam.detach())))
        opt.step()
        opt.zero_grad(set_to_none=False)
        loss = stop.loss(space.theta(lam.detach()))
        history.append({"step": step, "stop_loss": loss})
        if tick is not None:
            tick()
        if loss < best[0]:
            best, waited = (loss, step, lam.detach().clone()), 0
        elif (waited := waited + 1) >= patience:
            break
    return Fit(space.groups, best[2].tolist(), start, best[0], best[1], history)
