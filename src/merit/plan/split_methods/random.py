"""``random``: a random balanced split (the paper's baseline), any K."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from merit.plan.partition import PlanError, PlanInputs, SplitOptions, Splitter
from merit.plan.split_methods import SPLITTERS


def random_split(samples: Sequence[float], k: int, rng: np.random.Generator) -> np.ndarray:
    """Random balanced split: datasets in random order, each to the group with fewest samples."""
    s = np.asarray(samples, dtype=np.float64)
    if k > len(s):
        raise PlanError(f"K = {k} groups is more than the {len(s)} datasets")
    groups = np.zeros(len(s), dtype=np.int64)
    load = np.zeros(k)
    for i in rng.permutation(len(s)):
        g = int(np.argmin(load + 1e-9 * rng.random(k)))
        groups[i] = g
        load[g] += s[i]
    return groups


def _random(x: PlanInputs, k: int, rng: np.random.Generator, opts: SplitOptions) -> np.ndarray:
    return random_split(x.samples, k, rng)


RANDOM = SPLITTERS.register(
    Splitter(
        "random",
        _random,
        True,
        "random balanced split (paper's baseline)",
        order=30,
        note="ignores the data",
    )
)
