"""A user's splitter, as a plugin would add one: importing this module registers ``alternate``
(dataset i goes to group i mod K), which ``compare`` then plans with beside the built-ins."""

from __future__ import annotations

import numpy as np

from merit.plan.partition import Splitter
from merit.plan.split_methods import SPLITTERS


def alternate(x, k: int, rng: np.random.Generator, opts) -> np.ndarray:
    return np.arange(len(x.samples)) % k


ALTERNATE = SPLITTERS.register(Splitter("alternate", alternate, True, "dataset i to group i mod K"))
