"""Predicted merging gain of a split (paper §3.2), under H = I and with the true Hessian.

A branch trained on group k moves θ0 by δ_k ≈ −τ ḡ_k (ḡ_k the token-weighted mean gradient of the
group, τ the gradient-flow time, η × steps for SGD). For a loss L with Hessian H at θ0 and merge
weights w_k (Σ w_k ḡ_k = ḡ),

    Σ_k w_k L(θ_k) − L(θ̄) ≈ ½ τ² Σ_k w_k (ḡ_k − ḡ)ᵀ H (ḡ_k − ḡ)

(for K = 2 equal groups, τ²/8 (ḡ_1 − ḡ_2)ᵀ H (ḡ_1 − ḡ_2), the paper's form). Under H ≈ I it
needs only the sketched Gram matrix. The gain is measured against the branches' own average
loss, not against joint training: under δ_k = −τ ḡ_k the merged model θ0 − τ ḡ does not depend
on the split at all, so the merged loss can only be told apart at the next order, with the
group Hessians H_k (δ_k ≈ −τ ḡ_k + ½ τ² H_k ḡ_k); see ``merged_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from merit.plan.partition import onehot


def group_mix(groups: np.ndarray, tokens: Sequence[float], k: int) -> np.ndarray:
    """K × T matrix M with ḡ_k = Σ_t M_kt g_t (token-weighted mean of the group's gradients)."""
    a = np.asarray(tokens, dtype=np.float64)
    m = onehot(np.asarray(groups), k).T * a[None, :]
    return m / m.sum(axis=1, keepdims=True)


def gain_identity(gram: np.ndarray, groups: np.ndarray, tokens, k: int) -> tuple[float, float]:
    """(gain / τ², share) under H = I from the Gram of the datasets' mean gradients.

    gain / τ² = ½ Σ_k w_k |ḡ_k − ḡ|²; share is the fraction of the datasets' total spread
    Σ_t π_t |g_t − ḡ|² (π_t = token share) that lies between groups: 1 when every dataset is its
    own group, 0 when all groups have the same mean gradient.
    """
    a = np.asarray(tokens, dtype=np.float64)
    pi = a / a.sum()
    m = group_mix(groups, a, k)
    w = onehot(np.asarray(groups), k).T @ pi
    gk = m @ gram @ m.T  # Gram of the group means
    gbar = float(pi @ gram @ pi)
    between = float(w @ np.diag(gk)) - gbar
    total = float(pi @ np.diag(gram)) - gbar
    return 0.5 * between, between / total if total > 0 else 0.0


@dataclass
class Curvature:
    """Scalars measured at θ0 with Hessian-vector products (see ``merit.plan.curvature``).

    Split-independent: ``loss0`` = L_h(θ0) on held-out calibration batches, ``gh_g`` = g_hᵀ ḡ,
    ``g_hh_g`` = ḡᵀ H_h ḡ. Per candidate: ``quad`` = Σ_k w_k (ḡ_k − ḡ)ᵀ H_h (ḡ_k − ḡ) and
    ``cross`` = Σ_k w_k g_hᵀ H_k ḡ_k (H_k the Hessian of group k's loss).
    """

    loss0: float
    gh_g: float
    g_hh_g: float
    quad: list[float]
    cross: list[float]
    cross_joint: float = float("nan")  # g_hᵀ H ḡ: the same term for one branch on everything

    def horizon(self) -> float | None:
        """τ* = g_hᵀḡ / ḡᵀH_hḡ: the step along −ḡ that minimises the held-out quadratic."""
        return self.gh_g / self.g_hh_g if self.g_hh_g > 0 and self.gh_g > 0 else None


def merged_loss(c: Curvature, i: int, tau: float) -> float:
    """Predicted held-out loss of θ̄ for candidate ``i`` after gradient-flow time τ.

    δ_k ≈ −τ ḡ_k + ½ τ² H_k ḡ_k (the flow on group k's quadratic, to second order), so
    δ̄ = Σ_k w_k δ_k = −τ ḡ + ½ τ² Σ_k w_k H_k ḡ_k and, to O(τ²),
    L_h(θ̄) ≈ L_h(θ0) − τ g_hᵀ ḡ + ½ τ² (ḡᵀ H_h ḡ + Σ_k w_k g_hᵀ H_k ḡ_k).
    Only the last term depends on the split.
    """
    return c.loss0 - tau * c.gh_g + 0.5 * tau**2 * (c.g_hh_g + c.cross[i])


def joint_loss(c: Curvature, tau: float) -> float:
    """``merged_loss`` of the one-group plan (joint training on everything), same horizon."""
    return c.loss0 - tau * c.gh_g + 0.5 * tau**2 * (c.g_hh_g + c.cross_joint)


def gain_hessian(c: Curvature, i: int, tau: float) -> float:
    """½ τ² Σ_k w_k (ḡ_k − ḡ)ᵀ H (ḡ_k − ḡ), in loss units."""
    return 0.5 * tau**2 * c.quad[i]
