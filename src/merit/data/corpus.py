"""The run's mixture, loaded once, and its examples tokenized by θ0's processor once per split."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np

from merit.config import RunConfig
from merit.data.bigbench import resolve_bigbench
from merit.data.formats import DataError
from merit.data.mixture import Mixture, MixtureDataset, encode, load_mixture, token_lengths
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


# The splits that are trained on (and so are tokenized with data.loss_on and cached here).
_TRAINED = ("calibration", "validation", "train")


def _emptied(old: MixtureDataset, new: MixtureDataset) -> bool:
    """Whether dropping overlong examples left a split of ``old`` that had some with none."""
    return any(old.splits[split] and not new.splits[split] for split in new.overlong)


class Corpus:
    """The mixture of a run (BIG-bench resolved first, if used) and its tokenized splits."""

    def __init__(self, cfg: RunConfig, cache: Path):
        self.cfg = cfg
        self.cache = cache
        self._encoded: dict[str, dict[str, list[Encoded]]] = {}
        self._fitted: Mixture | None = None

    @cached_property
    def bigbench_dir(self) -> Path | None:
        return resolve_bigbench(self.cfg.data.bigbench, self.cache, self.cfg.runtime.progress)

    @cached_property
    def mixture(self) -> Mixture:
        """The mixture as loaded and split, before ``data.overlong`` (see :meth:`fitted`)."""
        demo = self.cfg.model.path == "demo"
        base = self.cfg.model.demo.examples_per_dataset if demo else 0
        return load_mixture(self.cfg.data, self.bigbench_dir, base_examples=base)

    def fitted(self, base: Base) -> Mixture:
        """The mixture every stage reads: ``data.overlong`` applied to each split once per
        process (its trained splits tokenized on the way, and kept)."""
        if self._fitted is None:
            raw = self.mixture
            if base.is_vision:  # image-text examples are never cut
                self._fitted = raw
            else:
                fit = [self._fit(d, base, trained=True) for d in raw.datasets]
                unseen = [self._fit(d, base, trained=False) for d in raw.unseen]
                # A dataset with a split that dropping left empty cannot be calibrated, trained
                # or scored: it is left out.
                pairs = zip(raw.datasets + raw.unseen, fit + unseen)
                out = sorted(new.name for old, new in pairs if _emptied(old, new))
                self._fitted = replace(
                    raw, datasets=[d for d in fit if d.name not in out],
                    unseen=[d for d in unseen if d.name not in out], too_long=out,
                )  # fmt: skip
        return self._fitted

    def _fit(self, d: MixtureDataset, base: Base, trained: bool) -> MixtureDataset:
        """``d`` with its examples over ``model.max_length`` refused, dropped or kept to be
        truncated (``data.overlong``), counted per split."""
        limit, policy = self.cfg.model.max_length, self.cfg.data.overlong
        splits, over = dict(d.splits), {}
        for split in (*_TRAINED, "eval") if trained else ("eval",):
            examples = d.examples(split)
            if split == "eval":
                sizes = token_lengths(base.processor, examples, choices=True)
            else:
                enc = self.encode(examples, base, max_length=sys.maxsize)
                sizes = [len(e.input_ids) for e in enc]
            bad = [i for i, n in enumerate(sizes) if n > limit]
            if bad and policy == "error":
                i = bad[0]
                raise DataError(
                    f"{d.name}: {examples[i].source}: {sizes[i]} tokens, over model.max_length="
                    f"{limit} ({len(bad)} such in its {split} split; data.overlong=error: set "
                    "drop or truncate, or raise model.max_length)"
                )
            keep = [i for i in range(len(examples)) if policy == "truncate" or sizes[i] <= limit]
            if bad:
                over[split] = len(bad)
                splits[split] = [splits[split][i] for i in keep]
            if split != "eval":  # kept: what training reads (uncut, or cut to the budget)
                if bad and policy == "truncate":
                    enc = self.encode(examples, base)
                self._encoded.setdefault(split, {})[d.name] = [enc[i] for i in keep]
        return replace(d, splits=splits, overlong=over)

    def encode(self, examples: list, base: Base, max_length: int | None = None) -> list[Encoded]:
        """Examples as training reads them (``data.loss_on``), cut to ``model.max_length``."""
        if not base.is_vision and any(ex.images for ex in examples):
            raise StageError(
                f"the data has images but θ0 ({self.cfg.model.path}) is a text-only model"
            )
        limit = max_length or self.cfg.model.max_length
        return encode(base.processor, examples, limit, self.cfg.data.loss_on)

    def encoded(self, split: str, base: Base) -> dict[str, list[Encoded]]:
        """Tokenized examples of one split, per dataset (tokenized once per process)."""
        mixture = self.fitted(base)
        if split not in self._encoded:
            self._encoded[split] = {
                d.name: self.encode(d.examples(split), base) for d in mixture.datasets
            }
        return self._encoded[split]

    def sample(self, split: str, n: int | None, seed: int, base: Base) -> list[Encoded]:
        """``n`` tokenized examples of ``split`` spread over datasets (all when ``n`` is None).
        Sampled first, tokenized after: the train split of 256 datasets is large."""
        raw = {d.name: d.examples(split) for d in self.fitted(base).datasets}
        if n is not None:
            raw = {"": stratified_sample(raw, n, seed)}
        return [e for v in raw.values() for e in self.encode(v, base)]
