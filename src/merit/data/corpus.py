"""The run's mixture, loaded once, and its examples tokenized by θ0's processor once per split."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np

from merit.config import RunConfig
from merit.data.bigbench import resolve_bigbench
from merit.data.mixture import Mixture, encode, load_mixture
from merit.errors import StageError
from merit.lm import Base, Encoded

T = TypeVar("T")


def stratified_sample(per_dataset: dict[str, Sequence[T]], n: int, seed: int) -> list[T]:
    """``n`` examples spread over datasets as evenly as possible (round-robin, seeded)."""
    rng = np.random.default_rng(seed)
    names = sorted(k for k, v in per_dataset.items() if v)
    pools = {k: list(rng.permutation(len(per_dataset[k]))) for k in names}
    order = [names[i] for i in rng.permutation(len(names))]
    out: list[T] = []
    while len(out) < n and any(pools.values()):
        for k in order:
            if pools[k] and len(out) < n:
                out.append(per_dataset[k][pools[k].pop()])
    return out


class Corpus:
    """The mixture of a run (BIG-bench resolved first, if used) and its tokenized splits."""

    def __init__(self, cfg: RunConfig, cache: Path):
        self.cfg = cfg
        self.cache = cache
        self._encoded: dict[str, dict[str, list[Encoded]]] = {}

    @cached_property
    def bigbench_dir(self) -> Path | None:
        return resolve_bigbench(self.cfg.data.bigbench, self.cache, self.cfg.runtime.progress)

    @cached_property
    def mixture(self) -> Mixture:
        demo = self.cfg.model.path == "demo"
        base = self.cfg.model.demo.examples_per_dataset if demo else 0
        return load_mixture(self.cfg.data, self.bigbench_dir, base_examples=base)

    def encode(self, examples: list, base: Base) -> list[Encoded]:
        if not base.is_vision and any(ex.images for ex in examples):
            raise StageError(
                f"the data has images but θ0 ({self.cfg.model.path}) is a text-only model"
            )
        return encode(base.processor, examples, self.cfg.model.max_length)

    def encoded(self, split: str, base: Base) -> dict[str, list[Encoded]]:
        """Tokenized examples of one split, per dataset (tokenized once per process)."""
        if split not in self._encoded:
            self._encoded[split] = {
                d.name: self.encode(d.examples(split), base) for d in self.mixture.datasets
            }
        return self._encoded[split]

    def sample(self, split: str, n: int | None, seed: int, base: Base) -> list[Encoded]:
        """``n`` tokenized examples of ``split`` spread over datasets (all when ``n`` is None).
        Sampled first, tokenized after: the train split of 256 datasets is large."""
        raw = {d.name: d.examples(split) for d in self.mixture.datasets}
        if n is not None:
            raw = {"": stratified_sample(raw, n, seed)}
        return [e for v in raw.values() for e in self.encode(v, base)]
