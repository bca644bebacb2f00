"""Conflict-aware split of the datasets into K = 2^r sample-balanced groups (paper §3.2).

At depth j every current group is cut in two along conflict axis j at its sample-weighted median,
so datasets that pull θ0 in opposite directions along the main conflict axes train in different
branches, and every branch sees about the same number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PlanError(ValueError):
    """The requested plan cannot be made from these datasets."""


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


def median_split(z: np.ndarray, samples: Sequence[float], rank: int) -> np.ndarray:
    """Group id in [0, 2^rank) of each dataset: recursive sample-balanced median splits.

    Bit j of the group id says on which side of the median of axis j (within its parent group)
    the dataset lies.
    """
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
            cut = balanced_cut(z[idx, j], w[idx])
            new[order[cut:]] = g | (1 << j)
        groups = new
    return groups


def group_weights(
    groups: np.ndarray, tokens: Sequence[int], k: int
) -> tuple[list[int], list[float]]:
    """N_k (tokens of group k) and w_k = N_k / Σ N_j (the merge weights)."""
    n = [int(np.asarray(tokens)[groups == g].sum()) for g in range(k)]
    total = sum(n)
    return n, [x / total for x in n]
