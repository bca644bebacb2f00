"""``linear``: MERIT's merge, paper eq. 3, θ̄ = Σ_k w_k θ_k.

With w_k = N_k / Σ_j N_j (computed by the caller) it is the token-weighted average of the
branches. θ0 takes no part, so the base may be any checkpoint of the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping

from merit.merge.methods import METHODS, MergeMethod


def _coefficients(
    weights: tuple[float, ...], _params: Mapping[str, float]
) -> tuple[float, tuple[float, ...]]:
    return 0.0, weights


METHODS.register(
    MergeMethod(
        name="linear",
        formula="θ̄ = Σ_k w_k θ_k",
        help="Σ w_k θ_k (paper eq. 3)",
        coefficients=_coefficients,
        order=0,
    )
)
