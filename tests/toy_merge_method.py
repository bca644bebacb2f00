"""A toy merge method, registered on import as a plugin would be: θ̄ = s·max_k θ_k, element-wise.

It takes the per-tensor path (no coefficients), so its chunks run through a method's own
function; ``scale`` is its parameter and must be positive.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merit.merge.errors import MergeError
from merit.merge.methods import METHODS, MergeMethod, Param

NAME = "toy_max"


def _check(_weights: tuple[float, ...], params: Mapping[str, float]) -> None:
    if params["scale"] <= 0:
        raise MergeError(f"{NAME}: scale must be positive, got {params['scale']:g}")


def _merge(theta0, thetas, weights, params, stats) -> torch.Tensor:
    out = thetas[0]  # a scratch buffer: overwriting it is allowed
    for theta in thetas[1:]:
        torch.maximum(out, theta, out=out)
    return out.mul_(params["scale"])


METHOD = METHODS.register(
    MergeMethod(
        name=NAME,
        formula="θ̄ = s·max_k θ_k (element-wise)",
        help="s·max_k θ_k, element-wise (a test's toy)",
        params=(Param("scale", 1.0, "s, a positive multiple"),),
        check=_check,
        merge=_merge,
        order=100,
    ),
    replace=True,
)
