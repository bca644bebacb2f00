"""``ties`` (arXiv 2306.01708, as mergekit 0.1.5 computes it): trim each task vector to its
``density`` largest magnitudes, elect a sign per element (that of Σ_k w_k δ_k), average the agreeing
ones weighted by w_k (the disjoint mean), scale by λ, add to θ0. Exactly ⌊density·n⌋ elements of
each task vector are kept, magnitude ties at the cut in index order (mergekit's ``argsort``
breaks them arbitrarily).

Trimming needs each task vector's magnitude threshold over the whole tensor: one extra read of
it (``statistics``); the rest is element-wise, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Mapping

from merit.merge.errors import MergeError
from merit.merge.methods import METHODS, MergeMethod, Param
from merit.merge.methods.sparsify import consensus, magnitude_threshold, task_vectors, trim

DENSITY = Param("density", 1.0, "the fraction of each task vector kept, in (0, 1]")
SCALE = Param("scale", 1.0, "λ, the multiple of the merged task vector")


def check_density(_weights: tuple[float, ...], params: Mapping[str, float]) -> None:
    if not 0 < params["density"] <= 1:
        raise MergeError(f"density must be in (0, 1], got {params['density']:g}")


def _thresholds(theta0, thetas, _weights, params) -> list[tuple[float, int]]:
    return [magnitude_threshold(theta0, theta, params["density"]) for theta in thetas]


def _merge(theta0, thetas, weights, params, thresholds, start=0):
    deltas = [trim(d, t, start) for d, t in zip(task_vectors(theta0, thetas), thresholds)]
    return consensus(theta0, deltas, weights, params["scale"], normalize=True)


METHODS.register(
    MergeMethod(
        name="ties",
        formula="θ̄ = θ0 + λ·disjoint-mean_k(w_k·trim_density(θ_k − θ0), elected sign)",
        help="TIES: trim to --density, elect signs, disjoint mean, × --scale; needs --base θ0",
        needs_base=True,
        params=(DENSITY, SCALE),
        check=check_density,
        merge=_merge,
        statistics=_thresholds,
        chunk_offset=True,
        order=3,
    )
)
