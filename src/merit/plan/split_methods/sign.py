"""``sign``: the median splitter's recursion, but each cut is where axis j changes sign (datasets
that pull θ0 in opposite directions along the axis), moved only as far as the balance tolerance
requires; K = 2^r."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from merit.plan.partition import PlanError, PlanInputs, SplitOptions, Splitter, power_of_two
from merit.plan.split_methods import SPLITTERS
from merit.plan.split_methods.median import balanced_cut, recursive_split


def sign_cut(values: np.ndarray, weights: np.ndarray, tolerance: float) -> int:
    """Cut at the sign change of ``values``, moved to the nearest cut whose lower half holds
    between 1/2 − tolerance and 1/2 + tolerance of the weight (the median cut if none does)."""
    n = len(values)
    if n < 2:
        raise PlanError("cannot split a group of fewer than two datasets")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    frac = cum[:-1] / cum[-1]  # lower-half share of cut c = 1..n-1
    cuts = np.arange(1, n)
    ok = np.abs(frac - 0.5) <= tolerance + 1e-12
    if not ok.any():
        return balanced_cut(values, weights)
    zero = int(np.searchsorted(values[order], 0.0))  # items below zero
    score = np.abs(cuts - zero) + 1e-6 * np.abs(frac - 0.5)  # ties: the more balanced
    score[~ok] = np.inf
    return int(cuts[np.argmin(score)])


def sign_split(
    z: np.ndarray, samples: Sequence[float], rank: int, tolerance: float = 0.1
) -> np.ndarray:
    """Like ``median_split``, but each cut is at the sign change of axis j, moved only as far
    as needed to keep every final group's samples within K⁻¹ (1 ± ``tolerance``) of the total.

    r nested cuts each within 1/2 ± t give groups within 2^-r (1 ± 2t)^r, so each cut gets
    t = ((1 + tolerance)^(1/r) − 1) / 2.
    """
    per_cut = ((1 + tolerance) ** (1 / max(rank, 1)) - 1) / 2
    return recursive_split(z, samples, rank, lambda v, w: sign_cut(v, w, per_cut))


def _sign(x: PlanInputs, k: int, rng: np.random.Generator, opts: SplitOptions) -> np.ndarray:
    r = power_of_two(k)
    return sign_split(x.embedding(r).z, x.samples, r, opts.tolerance)


SIGN = SPLITTERS.register(
    Splitter("sign", _sign, False, "recursive sign splits on PCA axes", order=20)
)
