"""What every splitter shares: what it sees (``PlanInputs``), its interface (``Splitter``) and
helpers on group labels.

A splitter is a rule (plan inputs, K, a seeded generator, options) → a group id in [0, K) per
dataset. The built-ins live one per module in :mod:`merit.plan.split_methods`, registered in its
``SPLITTERS``; :mod:`merit.plan.splitters` compares them side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from merit.plan.conflict import Embedding, conflict_embedding, cosine_from_gram, debiased_gram


class PlanError(ValueError):
    """The requested plan cannot be made from these datasets."""


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
class SplitOptions:
    """The settings a splitter is given: the balance tolerance (each group's samples within
    (1 ± tolerance) × total/K) and the restarts of a local search."""

    tolerance: float = 0.1
    restarts: int = 8


SplitRule = Callable[[PlanInputs, int, np.random.Generator, SplitOptions], np.ndarray]


@dataclass(frozen=True)
class Splitter:
    """A named rule (inputs, K, generator) → group id in [0, K) per dataset.

    ``split`` also gets the ``options`` the splitter was made with (``with_options``). ``any_k``
    False: the rule makes K = 2^r groups only. ``order`` places it in ``compare``'s table (the
    built-ins 10 to 40, so another splitter comes after them unless it says otherwise); ``note``
    is said beside every plan it makes.
    """

    name: str
    split: SplitRule
    any_k: bool
    description: str
    order: int = 100
    note: str = ""
    options: SplitOptions = SplitOptions()

    def with_options(self, tolerance: float = 0.1, restarts: int = 8) -> Splitter:
        return replace(self, options=SplitOptions(tolerance, restarts))

    def __call__(self, x: PlanInputs, k: int, rng: np.random.Generator) -> np.ndarray:
        if not self.any_k and power_of_two(k) is None:
            raise PlanError(
                f"the {self.name} splitter makes K = 2^r groups, not K = {k}; "
                "use planning.splitter=gain or random for any K"
            )
        return np.asarray(self.split(x, k, rng, self.options), dtype=np.int64)


# -- group labels -------------------------------------------------------------------------------
def onehot(groups: np.ndarray, k: int) -> np.ndarray:
    """T × K indicator of each dataset's group."""
    m = np.zeros((len(groups), k))
    m[np.arange(len(groups)), groups] = 1.0
    return m


def max_deviation(load: np.ndarray, target: float) -> float:
    """Largest |load_k − target| / target."""
    return float(np.abs(load - target).max() / target)


def canonical_labels(groups: np.ndarray, k: int) -> np.ndarray:
    """Relabel groups by first appearance, so equal partitions have equal labels."""
    out = np.empty_like(groups)
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        if int(g) not in seen:
            seen[int(g)] = len(seen)
        out[i] = seen[int(g)]
    return out
