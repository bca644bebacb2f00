"""``task_vector``: task arithmetic, θ̄ = θ0 + s·Σ_k w_k (θ_k − θ0); also registered under
mergekit's name, ``task_arithmetic`` (arXiv 2212.04089).

With s = 1 and Σ w = 1 it is paper eq. 3; the shrinkage control scales one model's task vector.
A token-weighted average moves about 1/K as far from θ0 as joint training: s > 1 restores the
step (and counts a component every branch learned s times). Summed as
(1 − s·Σw)·θ0 + Σ_k (s·w_k)·θ_k so that it runs on the linear-combination executor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from merit.merge.methods import METHODS, MergeMethod, Param

# A base coefficient 1 − s·Σw this small is rounding noise in decimal weights (0.4 + 0.3 + 0.2
# + 0.1 ≠ 1 in binary): dropping it makes the task-vector form with s = 1 and Σw = 1 bitwise the
# linear merge, as it is mathematically.
_ZERO_COEFFICIENT = 1e-12


def _coefficients(
    weights: tuple[float, ...], params: Mapping[str, float]
) -> tuple[float, tuple[float, ...]]:
    coefficients = tuple(params["scale"] * w for w in weights)
    c0 = math.fsum([1.0, *(-c for c in coefficients)])
    if abs(c0) <= _ZERO_COEFFICIENT:
        c0 = 0.0
    return c0, coefficients


TASK_VECTOR = METHODS.register(
    MergeMethod(
        name="task_vector",
        formula="θ̄ = θ0 + s·Σ_k w_k (θ_k − θ0)",
        help="θ0 + s·Σ w_k (θ_k − θ0), needs --base θ0",
        needs_base=True,
        params=(Param("scale", 1.0, "s, the multiple of the summed task vectors"),),
        coefficients=_coefficients,
        order=1,
    )
)
METHODS.register(
    dataclasses.replace(
        TASK_VECTOR,
        name="task_arithmetic",
        help="θ0 + λ·Σ w_k (θ_k − θ0), λ = --scale (may exceed 1), needs --base θ0",
        order=2,
    )
)
