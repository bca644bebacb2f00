"""``learned``: θ0 + Σ_k λ_k^g (θ_k − θ0), one coefficient per branch and layer group, fitted on
the validation split (:mod:`merit.diagnose.coefficients`). The registered method is the
task-vector form at the starting point λ_k = scale·w_k; the merge stage fits λ and passes one
task-vector weighting per tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from merit.merge.errors import MergeError
from merit.merge.methods import METHODS, Param
from merit.merge.methods.task_vector import TASK_VECTOR


def _check(_weights: tuple[float, ...], params: Mapping[str, float]) -> None:
    if params["groups"] < 1 or not float(params["groups"]).is_integer():
        raise MergeError(f"groups must be a whole number ≥ 1, got {params['groups']:g}")
    if params["steps"] < 0 or not float(params["steps"]).is_integer():
        raise MergeError(f"steps must be a whole number ≥ 0, got {params['steps']:g}")
    if params["lr"] <= 0:
        raise MergeError(f"lr must be positive, got {params['lr']:g}")


METHODS.register(
    dataclasses.replace(
        TASK_VECTOR,
        name="learned",
        formula="θ̄ = θ0 + Σ_k λ_k^g (θ_k − θ0), λ fitted per layer group on the validation split",
        help="per-branch, per-layer-group coefficients fitted on the validation split (a run's "
        "merge only: merging.method: learned)",
        params=(
            Param("scale", 1.0, "the starting point: λ_k = scale·w_k"),
            Param("groups", 4.0, "contiguous groups of transformer blocks (plus embeddings, rest)"),
            Param("steps", 20.0, "Adam steps at most (early stopping on part of the split)"),
            Param("lr", 0.01, "Adam's learning rate on λ (λ_k starts near w_k ≈ 1/K)"),
        ),
        check=_check,
        fitted="the validation split",
        order=8,
    )
)
