"""``dare_linear`` and ``dare_ties`` (arXiv 2311.03099): drop each task-vector element at random
with probability 1 − ``density`` and rescale the kept ones by 1/density (the expected task vector
is unchanged), then task arithmetic, or TIES' sign consensus without normalising (mergekit's
defaults for both).

The drops are a seeded function of (seed, checkpoint, element index), so a merge is reproducible
and does not depend on how the tensor is cut into chunks. mergekit 0.1.5 draws them from torch's
global generator and rescales to the task vector's L1 norm instead, so its drops cannot be matched.
"""

from __future__ import annotations

from merit.merge.methods import METHODS, MergeMethod, Param
from merit.merge.methods.sparsify import consensus, drop_at_random, task_vectors, weighted_sum
from merit.merge.methods.ties import DENSITY, SCALE, check_density

SEED = Param("seed", 0.0, "the seed of the random drops")


def _dropped(theta0, thetas, params, start):
    deltas = task_vectors(theta0, thetas)
    return drop_at_random(deltas, params["density"], start, int(params["seed"]))


def _linear(theta0, thetas, weights, params, _stats, start=0):
    deltas = _dropped(theta0, thetas, params, start)
    return weighted_sum(theta0, deltas, weights, params["scale"])


def _ties(theta0, thetas, weights, params, _stats, start=0):
    deltas = _dropped(theta0, thetas, params, start)
    return consensus(theta0, deltas, weights, params["scale"], normalize=False)


for name, merge, order, what in (
    ("dare_linear", _linear, 4, "θ0 + λ·Σ_k w_k·drop_p(θ_k − θ0)/p"),
    ("dare_ties", _ties, 5, "θ0 + λ·Σ_k agreeing w_k·drop_p(θ_k − θ0)/p, elected sign"),
):
    METHODS.register(
        MergeMethod(
            name=name,
            formula=f"θ̄ = {what}",
            help=f"DARE{' + TIES signs' if name == 'dare_ties' else ''}: random drop to "
            "--density, rescaled; × --scale; needs --base θ0",
            needs_base=True,
            params=(DENSITY, SCALE, SEED),
            check=check_density,
            merge=merge,
            chunk_offset=True,
            order=order,
        )
    )
