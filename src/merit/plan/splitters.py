"""Conflict-aware split of the datasets into K sample-balanced groups (paper §3.2), and how far
to trust it.

Splitters share one interface (``Splitter``: plan inputs, K, a seeded generator → a group id per
dataset), each aiming at sample-balanced groups. They are registered in
``merit.plan.split_methods.SPLITTERS``, one module each, and ``compare`` plans with every one; the
built-ins, in their order:

- ``median``: the paper's — at depth j every current group is cut in two along conflict axis j at
  its sample-weighted median, so K = 2^r;
- ``sign``: the same recursion, cut where axis j changes sign (datasets that pull θ0 in opposite
  directions along the axis), moved only as far as the balance tolerance requires; K = 2^r;
- ``random``: a random balanced split (the paper's baseline), any K;
- ``gain``: a balanced partition into any K that maximises the predicted merging gain
  (``merit.plan.prediction``) by local search over moves and swaps from several seeded starts.

Balance: datasets are never divided, so no splitter can always keep every group within
(1 ± ``balance_tolerance``) × total/K samples (the median split is not even asked to); ``compare``
reports each plan's balance and warns when it misses the tolerance.

Stability (``merit.plan.stability``): resampling each dataset's calibration parts redraws the
calibration sample, and re-planning each draw says how often each dataset lands in its group and
how well two resampled plans agree (ARI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from merit.plan.conflict import PartGram

# Plans' callers (the plan stage, curvature, the tests and the benchmarks) import the splitters'
# pieces, the predictions and stability from here.
from merit.plan.partition import (  # noqa: F401
    PlanError,
    PlanInputs,
    SplitOptions,
    Splitter,
    canonical_labels,
    max_deviation,
    power_of_two,
)
from merit.plan.prediction import (  # noqa: F401
    Curvature,
    gain_hessian,
    gain_identity,
    group_mix,
    joint_loss,
    merged_loss,
)
from merit.plan.split_methods import SPLITTERS
from merit.plan.split_methods.gain import gain_partition, improve_gain  # noqa: F401
from merit.plan.split_methods.median import balanced_cut, median_split  # noqa: F401
from merit.plan.split_methods.random import random_split  # noqa: F401
from merit.plan.split_methods.sign import sign_cut, sign_split  # noqa: F401
from merit.plan.stability import (  # noqa: F401
    Stability,
    adjusted_rand_index,
    align_labels,
    changed_groups,
    resampled_cosine_agreement,
    resampled_grams,
    stability,
)


def splitters(tolerance: float = 0.1, restarts: int = 8) -> dict[str, Splitter]:
    """Every registered splitter, by name in ``order``, made with these options."""
    return {s.name: s.with_options(tolerance, restarts) for s in SPLITTERS}


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
    return ratio, max_deviation(load, load.sum() / k)


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
    dev = max_deviation(load, target)
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
    names: Sequence[str] | None = None,
) -> list[Candidate]:
    """Every splitter's plan for K groups, with predicted gain (H = I), balance and — when part
    sketches are given — bootstrap stability over ``draws`` resampled calibration draws (the same
    draws for every splitter, each re-planned with the same seed). A plan whose groups miss the
    balance ``tolerance`` carries a warning in its ``warnings`` (and says so in its ``note``).
    ``names``: the splitters to compare, in this order (default: every registered one)."""
    table = splitters(tolerance)
    grams = resampled_grams(parts, draws, seed) if parts is not None and draws > 0 else []
    noise = parts.noise() if parts is not None else None
    resampled = [PlanInputs.from_gram(g, x.samples, x.tokens, noise) for g in grams]
    out = []
    for name in SPLITTERS.names() if names is None else names:
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
        notes = [sp.note]
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
        known = ", ".join((*SPLITTERS.names(), "auto"))
        raise PlanError(f"unknown splitter {splitter!r} (known: {known})")
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
