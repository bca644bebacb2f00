"""Conflict-aware split of the datasets into K sample-balanced groups (paper §3.2), and how far
to trust it.

Four splitters share one interface (``Splitter``: plan inputs, K, a seeded generator → a group
id per dataset), each aiming at sample-balanced groups:

- ``median``: the paper's — at depth j every current group is cut in two along conflict axis j at
  its sample-weighted median, so K = 2^r;
- ``sign``: the same recursion, cut where axis j changes sign (datasets that pull θ0 in opposite
  directions along the axis), moved only as far as the balance tolerance requires; K = 2^r;
- ``random``: a random balanced split (the paper's baseline), any K;
- ``gain``: a balanced partition into any K that maximises the predicted merging gain (below) by
  local search over moves and swaps from several seeded starts.

Predicted merging gain (paper §3.2): a branch trained on group k moves θ0 by δ_k ≈ −τ ḡ_k (ḡ_k
the token-weighted mean gradient of the group, τ the gradient-flow time, η × steps for SGD). For
a loss L with Hessian H at θ0 and merge weights w_k (Σ w_k ḡ_k = ḡ),

    Σ_k w_k L(θ_k) − L(θ̄) ≈ ½ τ² Σ_k w_k (ḡ_k − ḡ)ᵀ H (ḡ_k − ḡ)

(for K = 2 equal groups, τ²/8 (ḡ_1 − ḡ_2)ᵀ H (ḡ_1 − ḡ_2), the paper's form). Under H ≈ I it
needs only the sketched Gram matrix. The gain is measured against the branches' own average
loss, not against joint training: under δ_k = −τ ḡ_k the merged model θ0 − τ ḡ does not depend
on the split at all, so the merged loss can only be told apart at the next order, with the
group Hessians H_k (δ_k ≈ −τ ḡ_k + ½ τ² H_k ḡ_k); see ``merged_loss``.

Balance: datasets are never divided, so no splitter can always keep every group within
(1 ± ``balance_tolerance``) × total/K samples (the median split is not even asked to); ``compare``
reports each plan's balance and warns when it misses the tolerance.

Stability (``merit.plan.stability``): resampling each dataset's calibration parts redraws the
calibration sample, and re-planning each draw says how often each dataset lands in its group and
how well two resampled plans agree (ARI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from merit.plan.conflict import (
    Embedding,
    PartGram,
    conflict_embedding,
    cosine_from_gram,
    debiased_gram,
)

# Stability has its own module; plans' callers import its names from here too.
from merit.plan.stability import (  # noqa: F401
    Stability,
    adjusted_rand_index,
    align_labels,
    changed_groups,
    resampled_cosine_agreement,
    resampled_grams,
    stability,
)


class PlanError(ValueError):
    """The requested plan cannot be made from these datasets."""


# -- balanced cuts (the paper's recursion) -------------------------------------------------------
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


def _recursive_split(z: np.ndarray, samples, rank: int, cut: Callable) -> np.ndarray:
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
    return _recursive_split(z, samples, rank, balanced_cut)


def sign_split(
    z: np.ndarray, samples: Sequence[float], rank: int, tolerance: float = 0.1
) -> np.ndarray:
    """Like ``median_split``, but each cut is at the sign change of axis j, moved only as far
    as needed to keep every final group's samples within K⁻¹ (1 ± ``tolerance``) of the total.

    r nested cuts each within 1/2 ± t give groups within 2^-r (1 ± 2t)^r, so each cut gets
    t = ((1 + tolerance)^(1/r) − 1) / 2.
    """
    per_cut = ((1 + tolerance) ** (1 / max(rank, 1)) - 1) / 2
    return _recursive_split(z, samples, rank, lambda v, w: sign_cut(v, w, per_cut))


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


# -- predicted merging gain ----------------------------------------------------------------------
def _onehot(groups: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((len(groups), k))
    m[np.arange(len(groups)), groups] = 1.0
    return m


def group_mix(groups: np.ndarray, tokens: Sequence[float], k: int) -> np.ndarray:
    """K × T matrix M with ḡ_k = Σ_t M_kt g_t (token-weighted mean of the group's gradients)."""
    a = np.asarray(tokens, dtype=np.float64)
    m = _onehot(np.asarray(groups), k).T * a[None, :]
    return m / m.sum(axis=1, keepdims=True)


def gain_identity(gram: np.ndarray, groups: np.ndarray, tokens, k: int) -> tuple[float, float]:
    """(gain / τ², share) under H = I from the Gram of the datasets' mean gradients.

    gain / τ² = ½ Σ_k w_k |ḡ_k − ḡ|²; share is the fraction of the datasets' total spread
    Σ_t π_t |g_t − ḡ|² (π_t = token share) that lies between groups: 1 when every dataset is its
    own group, 0 when all groups have the same mean gradient.
    """
    a = np.asarray(tokens, dtype=np.float64)
    pi = a / a.sum()
    m = group_mix(groups, a, k)
    w = _onehot(np.asarray(groups), k).T @ pi
    gk = m @ gram @ m.T  # Gram of the group means
    gbar = float(pi @ gram @ pi)
    between = float(w @ np.diag(gk)) - gbar
    total = float(pi @ np.diag(gram)) - gbar
    return 0.5 * between, between / total if total > 0 else 0.0


@dataclass
class Curvature:
    """Scalars measured at θ0 with Hessian-vector products (see ``merit.plan.curvature``).

    Split-independent: ``loss0`` = L_h(θ0) on held-out calibration batches, ``gh_g`` = g_hᵀ ḡ,
    ``g_hh_g`` = ḡᵀ H_h ḡ. Per candidate: ``quad`` = Σ_k w_k (ḡ_k − ḡ)ᵀ H_h (ḡ_k − ḡ) and
    ``cross`` = Σ_k w_k g_hᵀ H_k ḡ_k (H_k the Hessian of group k's loss).
    """

    loss0: float
    gh_g: float
    g_hh_g: float
    quad: list[float]
    cross: list[float]
    cross_joint: float = float("nan")  # g_hᵀ H ḡ: the same term for one branch on everything

    def horizon(self) -> float | None:
        """τ* = g_hᵀḡ / ḡᵀH_hḡ: the step along −ḡ that minimises the held-out quadratic."""
        return self.gh_g / self.g_hh_g if self.g_hh_g > 0 and self.gh_g > 0 else None


def merged_loss(c: Curvature, i: int, tau: float) -> float:
    """Predicted held-out loss of θ̄ for candidate ``i`` after gradient-flow time τ.

    δ_k ≈ −τ ḡ_k + ½ τ² H_k ḡ_k (the flow on group k's quadratic, to second order), so
    δ̄ = Σ_k w_k δ_k = −τ ḡ + ½ τ² Σ_k w_k H_k ḡ_k and, to O(τ²),
    L_h(θ̄) ≈ L_h(θ0) − τ g_hᵀ ḡ + ½ τ² (ḡᵀ H_h ḡ + Σ_k w_k g_hᵀ H_k ḡ_k).
    Only the last term depends on the split.
    """
    return c.loss0 - tau * c.gh_g + 0.5 * tau**2 * (c.g_hh_g + c.cross[i])


def joint_loss(c: Curvature, tau: float) -> float:
    """``merged_loss`` of the one-group plan (joint training on everything), same horizon."""
    return c.loss0 - tau * c.gh_g + 0.5 * tau**2 * (c.g_hh_g + c.cross_joint)


def gain_hessian(c: Curvature, i: int, tau: float) -> float:
    """½ τ² Σ_k w_k (ḡ_k − ḡ)ᵀ H (ḡ_k − ḡ), in loss units."""
    return 0.5 * tau**2 * c.quad[i]


# -- the any-K partitioner -----------------------------------------------------------------------
def _gain_objective(gram, a, groups, k) -> float:
    oh = _onehot(groups, k) * a[:, None]
    big_a = oh.sum(axis=0)
    q = np.einsum("ik,ij,jk->k", oh, gram, oh)
    return float((q / big_a).sum())


def _max_dev(load: np.ndarray, target: float) -> float:
    return float(np.abs(load - target).max() / target)


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
        oh = _onehot(self.grp, self.k)
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
        limit = max(tolerance, _max_dev(st.load, target)) + 1e-12
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
        key = (max(_max_dev(_onehot(g, k).T @ s, s.sum() / k), tolerance), -f)
        if best_key is None or key < best_key:
            best, best_key = g, key
    return canonical_labels(best, k)


def canonical_labels(groups: np.ndarray, k: int) -> np.ndarray:
    """Relabel groups by first appearance, so equal partitions have equal labels."""
    out = np.empty_like(groups)
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        if int(g) not in seen:
            seen[int(g)] = len(seen)
        out[i] = seen[int(g)]
    return out


# -- one interface -------------------------------------------------------------------------------
@dataclass
class PlanInputs:
    """What a splitter may look at: the cosine matrix (paper), the Gram of the mean gradients
    (sampling bias removed from its diagonal), samples (balance) and tokens (merge weights)."""

    cosine: np.ndarray
    gram: np.ndarray
    samples: np.ndarray
    tokens: np.ndarray
    _emb: dict[int, Embedding] = field(default_factory=dict, repr=False)

    def embedding(self, rank: int) -> Embedding:
        if rank not in self._emb:
            self._emb[rank] = conflict_embedding(self.cosine, rank)
        return self._emb[rank]

    @classmethod
    def from_gram(cls, gram, samples, tokens, noise=None) -> PlanInputs:
        g = np.asarray(gram, dtype=np.float64)
        return cls(
            cosine=cosine_from_gram(g),
            gram=g if noise is None else debiased_gram(g, noise),
            samples=np.asarray(samples, dtype=np.float64),
            tokens=np.asarray(tokens, dtype=np.float64),
        )


def power_of_two(k: int) -> int | None:
    """r with 2^r = k, or None."""
    r = k.bit_length() - 1
    return r if k >= 1 and 2**r == k else None


@dataclass(frozen=True)
class Splitter:
    """A named rule (inputs, K, generator) → group id in [0, K) per dataset."""

    name: str
    split: Callable[[PlanInputs, int, np.random.Generator], np.ndarray]
    any_k: bool
    description: str

    def __call__(self, x: PlanInputs, k: int, rng: np.random.Generator) -> np.ndarray:
        if not self.any_k and power_of_two(k) is None:
            raise PlanError(
                f"the {self.name} splitter makes K = 2^r groups, not K = {k}; "
                "use planning.splitter=gain or random for any K"
            )
        return np.asarray(self.split(x, k, rng), dtype=np.int64)


def splitters(tolerance: float = 0.1, restarts: int = 8) -> dict[str, Splitter]:
    """The four splitters, by name."""

    def median(x, k, rng):
        r = power_of_two(k)
        return median_split(x.embedding(r).z, x.samples, r)

    def sign(x, k, rng):
        r = power_of_two(k)
        return sign_split(x.embedding(r).z, x.samples, r, tolerance)

    def rand(x, k, rng):
        return random_split(x.samples, k, rng)

    def gain(x, k, rng):
        r = power_of_two(k)
        starts = [] if r is None else [median(x, k, rng), sign(x, k, rng)]
        return gain_partition(x.gram, x.tokens, x.samples, k, rng, tolerance, restarts, starts)

    return {
        "median": Splitter("median", median, False, "recursive median splits on PCA axes (paper)"),
        "sign": Splitter("sign", sign, False, "recursive sign splits on PCA axes"),
        "random": Splitter("random", rand, True, "random balanced split (paper's baseline)"),
        "gain": Splitter("gain", gain, True, "balanced partition maximising predicted gain"),
    }


def group_weights(
    groups: np.ndarray, tokens: Sequence[int], k: int
) -> tuple[list[int], list[float]]:
    """N_k (tokens of group k) and w_k = N_k / Σ N_j (the merge weights)."""
    n = [int(np.asarray(tokens)[groups == g].sum()) for g in range(k)]
    total = sum(n)
    return n, [x / total for x in n]


# -- candidates side by side ---------------------------------------------------------------------
@dataclass
class Candidate:
    """One splitter's plan and what is predicted about it."""

    splitter: str
    groups: np.ndarray | None  # None when the splitter cannot make K groups
    note: str = ""
    gain: float = float("nan")  # ½ Σ_k w_k |ḡ_k − ḡ|² (H = I), per τ²
    share: float = float("nan")  # fraction of the datasets' gradient spread between groups
    balance: float = float("nan")  # largest / smallest group, in samples
    stability: Stability | None = None
    gain_hessian: float | None = None  # ½ τ² Σ_k w_k v_kᵀ H v_k, loss units
    merged_loss: float | None = None  # predicted held-out loss of θ̄
    deviation: float = float("nan")  # max_k |samples_k − total/K| / (total/K)
    warnings: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.groups is not None


def balance_of(groups: np.ndarray, samples, k: int) -> tuple[float, float]:
    """(largest / smallest group, largest relative deviation from total/K), in samples."""
    load = np.bincount(np.asarray(groups), weights=np.asarray(samples, float), minlength=k)
    ratio = float(load.max() / load.min()) if load.min() > 0 else float("inf")
    return ratio, _max_dev(load, load.sum() / k)


def balance_warning(
    splitter: str, groups: np.ndarray, samples, k: int, tolerance: float
) -> str | None:
    """A warning when some group's samples lie outside (1 ± tolerance) × total/K.

    Datasets are indivisible, so a median cut cannot balance a mixture dominated by a few large
    datasets; the branches then train for unequal numbers of steps and the merge weights
    (tokens) no longer match what each branch saw per step.
    """
    load = np.bincount(np.asarray(groups), weights=np.asarray(samples, float), minlength=k)
    target = load.sum() / k
    dev = _max_dev(load, target)
    if dev <= tolerance + 1e-12:
        return None
    return (
        f"unbalanced {splitter} plan: group samples range from {load.min():.0f} to "
        f"{load.max():.0f}, up to {dev:.0%} from the balanced {target:.0f} per group "
        f"(planning.balance_tolerance={tolerance}); datasets are not divided, so a large "
        "dataset can outweigh a whole group. What would fix it: planning.splitter=gain (it "
        "keeps to the tolerance where any partition can), or split the largest datasets"
    )


def compare(
    x: PlanInputs,
    k: int,
    parts: PartGram | None = None,
    draws: int = 0,
    seed: int = 0,
    tolerance: float = 0.1,
    names: Sequence[str] = ("median", "sign", "random", "gain"),
) -> list[Candidate]:
    """Every splitter's plan for K groups, with predicted gain (H = I), balance and — when part
    sketches are given — bootstrap stability over ``draws`` resampled calibration draws (the same
    draws for every splitter, each re-planned with the same seed). A plan whose groups miss the
    balance ``tolerance`` carries a warning in its ``warnings`` (and says so in its ``note``)."""
    table = splitters(tolerance)
    grams = resampled_grams(parts, draws, seed) if parts is not None and draws > 0 else []
    noise = parts.noise() if parts is not None else None
    resampled = [PlanInputs.from_gram(g, x.samples, x.tokens, noise) for g in grams]
    out = []
    for name in names:
        sp = table[name]
        if not sp.any_k and power_of_two(k) is None:
            out.append(Candidate(name, None, note=f"K={k} is not a power of two"))
            continue
        groups = sp(x, k, np.random.default_rng(seed))
        gain, share = gain_identity(x.gram, groups, x.tokens, k)
        ratio, deviation = balance_of(groups, x.samples, k)
        st = None
        if resampled:
            st = stability(groups, [sp(r, k, np.random.default_rng(seed)) for r in resampled], k)
        warning = balance_warning(name, groups, x.samples, k, tolerance)
        notes = ["ignores the data" if name == "random" else ""]
        if warning:  # in short: the full text is the plan's warning when this plan is chosen
            notes.append(f"unbalanced: a group {deviation:.0%} off total/K (> {tolerance:.0%})")
        out.append(
            Candidate(
                name,
                groups,
                note="; ".join(n for n in notes if n),
                gain=gain,
                share=share,
                balance=ratio,
                stability=st,
                deviation=deviation,
                warnings=[warning] if warning else [],
            )
        )
    return out


def choose(candidates: Sequence[Candidate], splitter: str, objective: str) -> int:
    """Index of the plan to use: the configured splitter's, or for ``auto`` the best available
    candidate under ``objective`` (the true-H gain when measured, else the H = I gain)."""
    if splitter != "auto":
        for i, c in enumerate(candidates):
            if c.splitter == splitter:
                if not c.available:
                    raise PlanError(f"the {splitter} splitter cannot make this plan: {c.note}")
                return i
        raise PlanError(f"unknown splitter {splitter!r}")
    ok = [i for i, c in enumerate(candidates) if c.available]
    if objective == "merged_loss":
        scored = [i for i in ok if candidates[i].merged_loss is not None]
        if not scored:
            raise PlanError(
                "objective merged_loss has no predictions to rank: it needs planning.hessian=true "
                "and a horizon (planning.horizon, or positive curvature along the mean gradient)"
            )
        return min(scored, key=lambda i: candidates[i].merged_loss)
    return max(
        ok,
        key=lambda i: (
            candidates[i].gain_hessian
            if candidates[i].gain_hessian is not None
            else candidates[i].gain
        ),
    )
