"""``task_arithmetic`` (mergekit's name; arXiv 2212.04089): θ̄ = θ0 + λ·Σ_k w_k (θ_k − θ0).

The token-weighted average moves about 1/K as far from θ0 as joint training; λ > 1 restores the
step (and counts a component every branch learned λ times). With λ = 1/Σw it is the linear merge,
bitwise. The same arithmetic as ``task_vector``, under the name mergekit and the literature use.
"""

from __future__ import annotations

from merit.merge.methods import METHODS, MergeMethod, Param
from merit.merge.methods.task_vector import _coefficients

METHODS.register(
    MergeMethod(
        name="task_arithmetic",
        formula="θ̄ = θ0 + λ·Σ_k w_k (θ_k − θ0)",
        help="θ0 + λ·Σ w_k (θ_k − θ0), λ = --scale (may exceed 1), needs --base θ0",
        needs_base=True,
        params=(Param("scale", 1.0, "λ, the multiple of the summed task vectors"),),
        coefficients=_coefficients,
        order=2,
    )
)
