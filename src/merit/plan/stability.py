"""How far to trust a plan: how it moves when the calibration sample is redrawn (paper §3.2's
split, re-planned on bootstrap draws).

Each dataset's calibration examples are cut into a few parts whose sketches are kept; resampling
the parts redraws the calibration sample, and re-planning each draw says how often each dataset
lands in its group and how well two resampled plans agree (adjusted Rand index, ARI).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from merit.plan.conflict import PartGram, cosine_from_gram, offdiag_pearson


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    """ARI of two labelings (1 = identical partitions, ≈0 = chance agreement)."""
    a, b = np.asarray(a), np.asarray(b)
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    n = len(a)
    total = n * (n - 1) / 2
    sum_ij = pairs(table)
    sum_a, sum_b = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = sum_a * sum_b / total if total else 0.0
    top = 0.5 * (sum_a + sum_b) - expected
    return 1.0 if top == 0 else (sum_ij - expected) / top


def align_labels(reference: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """Relabel ``other`` to agree with ``reference`` on as many datasets as possible (exact
    assignment for K ≤ 7, greedy beyond)."""
    ref, oth = np.asarray(reference), np.asarray(other)
    kk = max(k, int(ref.max()) + 1, int(oth.max()) + 1)
    overlap = np.zeros((kk, kk))
    np.add.at(overlap, (oth, ref), 1)
    if kk <= 7:
        perms = np.array(list(itertools.permutations(range(kk))))
        score = overlap[np.arange(kk)[None, :], perms].sum(axis=1)
        mapping = perms[int(np.argmax(score))]
    else:
        mapping = np.full(kk, -1)
        used: set[int] = set()
        for flat in np.argsort(-overlap, axis=None, kind="stable"):
            o, r = divmod(int(flat), kk)
            if mapping[o] < 0 and r not in used:
                mapping[o] = r
                used.add(r)
    return mapping[oth]


@dataclass
class Stability:
    """How a plan moves when the calibration sample is redrawn (bootstrap over its parts)."""

    per_dataset: np.ndarray  # fraction of draws in which each dataset lands in its plan group
    ari_pairs: float  # mean ARI between two resampled plans
    ari_plan: float  # mean ARI between a resampled plan and the plan
    draws: int


def resampled_grams(pg: PartGram, draws: int, seed: int) -> list[np.ndarray]:
    """Datasets' Gram for ``draws`` (rescaled) bootstrap draws of every dataset's calibration
    parts: each draw's spread around the plan's Gram is that of a new calibration sample."""
    rng = np.random.default_rng(seed)
    return [pg.dataset_gram(pg.bootstrap_counts(rng), rescale=True) for _ in range(draws)]


def stability(plan: np.ndarray, resampled: Sequence[np.ndarray], k: int) -> Stability:
    """Per-dataset assignment frequency and ARI agreement of resampled plans."""
    plan = np.asarray(plan)
    if not resampled:
        return Stability(np.ones(len(plan)), float("nan"), float("nan"), 0)
    aligned = np.array([align_labels(plan, r, k) for r in resampled])
    per = (aligned == plan[None, :]).mean(axis=0)
    vs_plan = float(np.mean([adjusted_rand_index(plan, r) for r in resampled]))
    pairs = [
        adjusted_rand_index(resampled[i], resampled[j])
        for i in range(len(resampled))
        for j in range(i + 1, len(resampled))
    ]
    return Stability(per, float(np.mean(pairs)) if pairs else float("nan"), vs_plan, len(resampled))


def resampled_cosine_agreement(grams: Sequence[np.ndarray]) -> float:
    """Mean off-diagonal Pearson between the cosine matrices of two resampled draws."""
    cos = [cosine_from_gram(g) for g in grams]
    vals = [offdiag_pearson(cos[i], cos[i + 1]) for i in range(0, len(cos) - 1, 2)]
    return float(np.mean(vals)) if vals else float("nan")


def changed_groups(
    old_names: Sequence[str], old_groups, new_names: Sequence[str], new_groups, k: int
) -> list[str]:
    """Datasets of an earlier plan whose group changed (group labels aligned first)."""
    pos = {n: i for i, n in enumerate(new_names)}
    common = [n for n in old_names if n in pos]
    if not common:
        return []
    old = np.asarray([old_groups[list(old_names).index(n)] for n in common])
    new = np.asarray([new_groups[pos[n]] for n in common])
    aligned = align_labels(old, new, k)
    return [n for n, a, b in zip(common, aligned, old) if a != b]
