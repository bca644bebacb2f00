"""``median``: the paper's splitter. At depth j every current group is cut in two along conflict
axis j at its sample-weighted median, so K = 2^r."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from merit.plan.partition import PlanError, PlanInputs, SplitOptions, Splitter, power_of_two
from merit.plan.split_methods import SPLITTERS


def balanced_cut(values: np.ndarray, weights: np.ndarray) -> int:
    """Number of items (sorted by value) that go to the lower half, balancing total weight.

    Datasets are atomic, so the cut is the prefix whose weight is closest to half, keeping both
    halves non-empty.
    """
    n = len(values)
    if n < 2:
        raise PlanError("cannot split a group of fewer than two datasets")
    cum = np.cumsum(weights[np.argsort(values, kind="stable")])
    half = cum[-1] / 2.0
    cut = int(np.argmin(np.abs(cum[:-1] - half))) + 1  # 1..n-1
    return cut


def recursive_split(z: np.ndarray, samples, rank: int, cut: Callable) -> np.ndarray:
    """Group id in [0, 2^rank): at depth j each group is cut in two along axis j by ``cut``
    (values, weights → items of the lower half)."""
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(samples, dtype=np.float64)
    t = z.shape[0]
    if 2**rank > t:
        raise PlanError(f"K = 2^{rank} = {2**rank} groups is more than the {t} datasets")
    groups = np.zeros(t, dtype=np.int64)
    for j in range(rank):
        new = groups.copy()
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            order = idx[np.argsort(z[idx, j], kind="stable")]
            c = cut(z[idx, j], w[idx])
            new[order[c:]] = g | (1 << j)
        groups = new
    return groups


def median_split(z: np.ndarray, samples: Sequence[float], rank: int) -> np.ndarray:
    """Group id in [0, 2^rank) of each dataset: recursive sample-balanced median splits.

    Bit j of the group id says on which side of the median of axis j (within its parent group)
    the dataset lies.
    """
    return recursive_split(z, samples, rank, balanced_cut)


def _median(x: PlanInputs, k: int, rng: np.random.Generator, opts: SplitOptions) -> np.ndarray:
    r = power_of_two(k)
    return median_split(x.embedding(r).z, x.samples, r)


MEDIAN = SPLITTERS.register(
    Splitter("median", _median, False, "recursive median splits on PCA axes (paper)", order=10)
)
