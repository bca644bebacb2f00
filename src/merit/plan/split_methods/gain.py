"""``gain``: a balanced partition into any K that maximises the predicted merging gain under
H = I (:mod:`merit.plan.prediction`), by local search over moves and swaps from several seeded
starts (random balanced splits, and for K = 2^r the median and sign splits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from merit.plan.partition import (
    PlanError,
    PlanInputs,
    SplitOptions,
    Splitter,
    canonical_labels,
    max_deviation,
    onehot,
    power_of_two,
)
from merit.plan.split_methods import SPLITTERS
from merit.plan.split_methods.median import MEDIAN
from merit.plan.split_methods.random import random_split
from merit.plan.split_methods.sign import SIGN


def _gain_objective(gram, a, groups, k) -> float:
    oh = onehot(groups, k) * a[:, None]
    big_a = oh.sum(axis=0)
    q = np.einsum("ik,ij,jk->k", oh, gram, oh)
    return float((q / big_a).sum())


@dataclass
class _Search:
    """One partition's sufficient statistics for the local search of ``improve_gain``.

    With a = tokens (scaled to mean 1) and G the Gram matrix, group k's objective term is
    q_k / A_k, q_k = Σ_{i,j∈k} a_i a_j G_ij, A_k = Σ_{i∈k} a_i; B_ik = Σ_{j∈k} a_j G_ij gives
    every move's and swap's change of q in O(1).
    """

    g: np.ndarray
    a: np.ndarray
    s: np.ndarray
    grp: np.ndarray
    k: int
    target: float

    def __post_init__(self):
        oh = onehot(self.grp, self.k)
        self.big_b = self.g @ (oh * self.a[:, None])
        self.big_a = oh.T @ self.a
        self.load = oh.T @ self.s
        self.count = oh.sum(axis=0)
        self.q = ((oh * self.a[:, None]) * self.big_b).sum(axis=0)
        self.base = self.q / self.big_a
        self.gd = np.diag(self.g)
        # Max deviation of the groups other than (x, y), for every pair.
        dev = np.abs(self.load - self.target) / self.target
        self.other = np.zeros((self.k, self.k))
        for x in range(self.k):
            for y in range(self.k):
                rest = [dev[z] for z in range(self.k) if z not in (x, y)]
                self.other[x, y] = max(rest) if rest else 0.0

    def best_move(self, limit: float) -> tuple[float, tuple]:
        """Best change of the objective by moving one dataset i to another group l."""
        a, s, src, t = self.a, self.s, self.grp, self.target
        ar = np.arange(len(a))
        qk = self.q[src] - 2 * a * self.big_b[ar, src] + a**2 * self.gd
        ak = self.big_a[src] - a
        ql = self.q[None, :] + 2 * a[:, None] * self.big_b + (a**2 * self.gd)[:, None]
        al = self.big_a[None, :] + a[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = (qk / ak)[:, None] - self.base[src][:, None] + ql / al - self.base[None, :]
        dev_src = np.abs(self.load[src] - s - t) / t
        dev_dst = np.abs(self.load[None, :] + s[:, None] - t) / t
        newdev = np.maximum(np.maximum(dev_src[:, None], dev_dst), self.other[src][:, :])
        feasible = (newdev <= limit) & (self.count[src] > 1)[:, None]
        feasible[ar, src] = False
        delta = np.where(feasible, delta, -np.inf)
        i, dst = np.unravel_index(int(np.argmax(delta)), delta.shape)
        return float(delta[i, dst]), ("move", int(i), int(dst))

    def best_swap(self, x: int, y: int, limit: float) -> tuple[float, tuple] | None:
        """Best change of the objective by swapping a dataset of group x with one of y."""
        ix, jy = np.flatnonzero(self.grp == x), np.flatnonzero(self.grp == y)
        if len(ix) == 0 or len(jy) == 0:
            return None
        a, b, gd, q = self.a, self.big_b, self.gd, self.q
        ai, aj = a[ix][:, None], a[jy][None, :]
        cross = 2 * ai * aj * self.g[np.ix_(ix, jy)]
        own_i, own_j = (a[ix] ** 2 * gd[ix])[:, None], (a[jy] ** 2 * gd[jy])[None, :]
        qx = q[x] - 2 * ai * b[ix, x][:, None] + own_i + 2 * aj * b[jy, x][None, :] + own_j
        qy = q[y] - 2 * aj * b[jy, y][None, :] + own_j + 2 * ai * b[ix, y][:, None] + own_i
        d = (qx - cross) / (self.big_a[x] - ai + aj) + (qy - cross) / (self.big_a[y] + ai - aj)
        d = d - self.base[x] - self.base[y]
        ds = self.s[jy][None, :] - self.s[ix][:, None]
        t = self.target
        nd = np.maximum(np.abs(self.load[x] + ds - t), np.abs(self.load[y] - ds - t)) / t
        d = np.where(np.maximum(nd, self.other[x, y]) <= limit, d, -np.inf)
        p, r = np.unravel_index(int(np.argmax(d)), d.shape)
        return float(d[p, r]), ("swap", int(ix[p]), int(jy[r]))


def improve_gain(
    gram: np.ndarray,
    tokens,
    samples,
    groups: np.ndarray,
    k: int,
    tolerance: float = 0.1,
    max_iter: int = 10_000,
) -> np.ndarray:
    """Local search (best move or swap) maximising Σ_k w_k |ḡ_k|² — equivalently the predicted
    gain under H = I — over partitions whose groups keep their samples within K⁻¹ (1 ± tolerance)
    of the total (never making the worst group worse when the start already violates it)."""
    g = np.asarray(gram, dtype=np.float64)
    a = np.asarray(tokens, dtype=np.float64)
    a = a / a.mean()  # scale-free; avoids overflow with large token counts
    s = np.asarray(samples, dtype=np.float64)
    grp = np.asarray(groups, dtype=np.int64).copy()
    target = s.sum() / k
    for _ in range(max_iter):
        st = _Search(g, a, s, grp, k, target)
        limit = max(tolerance, max_deviation(st.load, target)) + 1e-12
        best, action = 1e-12 * max(abs(st.base.sum()), 1e-300), None
        found = [st.best_move(limit)]
        found += [st.best_swap(x, y, limit) for x in range(k) for y in range(x + 1, k)]
        for f in found:
            if f is not None and f[0] > best:
                best, action = f
        if action is None:
            break
        if action[0] == "move":
            grp[action[1]] = action[2]
        else:
            i, j = action[1], action[2]
            grp[i], grp[j] = grp[j], grp[i]
    return grp


def gain_partition(
    gram: np.ndarray,
    tokens,
    samples,
    k: int,
    rng: np.random.Generator,
    tolerance: float = 0.1,
    restarts: int = 8,
    starts: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Balanced partition into any K maximising the predicted merging gain (H = I): local search
    from ``restarts`` random balanced splits and from any given ``starts``; the best one wins."""
    t = len(tokens)
    if k > t:
        raise PlanError(f"K = {k} groups is more than the {t} datasets")
    a = np.asarray(tokens, dtype=np.float64)
    inits = [random_split(samples, k, rng) for _ in range(restarts)] + [
        np.asarray(x) for x in starts
    ]
    s = np.asarray(samples, dtype=np.float64)
    best, best_key = None, None
    for g0 in inits:
        g = improve_gain(gram, a, s, g0, k, tolerance)
        f = _gain_objective(gram, a / a.mean(), g, k)
        # Balanced partitions first (a start that violates the tolerance may stay violating).
        key = (max(max_deviation(onehot(g, k).T @ s, s.sum() / k), tolerance), -f)
        if best_key is None or key < best_key:
            best, best_key = g, key
    return canonical_labels(best, k)


def _gain(x: PlanInputs, k: int, rng: np.random.Generator, opts: SplitOptions) -> np.ndarray:
    r = power_of_two(k)
    starts = [] if r is None else [MEDIAN.split(x, k, rng, opts), SIGN.split(x, k, rng, opts)]
    return gain_partition(
        x.gram, x.tokens, x.samples, k, rng, opts.tolerance, opts.restarts, starts
    )


GAIN = SPLITTERS.register(
    Splitter("gain", _gain, True, "balanced partition maximising predicted gain", order=40)
)
