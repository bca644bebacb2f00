"""Evaluation metrics: what a held-out score is, how it is averaged, resampled and printed.

A metric is one :class:`Metric` registered in :data:`METRICS`; each built-in lives in its own
module of this package (``nll``, ``accuracy``) and the registry imports them all on first use,
so a new built-in metric is one new file. Code outside merit (a plugin, a test) registers its own
by importing a module that calls ``METRICS.register``.

A metric is computed from *scored records*, one per held-out example, that scoring writes as
per-example arrays of a dataset's record (:data:`ARRAYS`): the answer's summed NLL and token
count, and whether the example was answered correctly where it was judged (multiple choice:
the length-normalised likelihood's choice, :mod:`.accuracy`; generative: exact match after
BIG-bench's post-processing, :mod:`.exact_match`). A dataset's value, the dataset average, the
stratified bootstrap and the paired comparisons of :mod:`merit.evaluate.statistics`, the tables
and the report all follow from :attr:`Metric.example` and :attr:`Metric.pooling`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from merit.registry import Registry

# How a dataset's per-example values become its value (and each bootstrap resample's):
PER_TOKEN = "per_token"  # Σ value / Σ answer tokens: the mean NLL per answer token
MEAN = "mean"  # the mean of the per-example values: a hit rate for 0/1 values

# Scored-record field -> the per-example array of a dataset's record that holds it. An example
# has a field when its array reaches it: generative datasets judge only their first
# ``evaluation.max_generate`` examples, so ``example_correct`` may be shorter than the others.
ARRAYS = {"nll": "example_nll", "tokens": "example_tokens", "correct": "example_correct"}
# The fields that are the same for every model scored on the same examples (the weights).
WEIGHTS = ("tokens",)

# Keys that records and summaries already use for something else: a metric cannot take them.
RESERVED = {"kind", "n", "n_accuracy", "accuracy_unnormalized", "datasets", "perplexity",
            "confidence", "metric", "summary", "unseen_summary"}  # fmt: skip

# The metric a reader looks at first: the report leads with it, and the tables count the
# datasets each model wins with it.
HEADLINE = "accuracy"


@dataclass(frozen=True)
class Format:
    """How a metric's numbers are printed: ``digits`` for a value in the evaluation's tables and
    for a difference, ``short_digits`` for an interval and for a cell of the wide tables (the
    report's per-family tables, the comparison's table)."""

    scale: float = 1.0  # 100: a rate printed in percent
    unit: str = ""  # printed after a value ("%")
    delta_unit: str = ""  # printed after a difference ("pt": percentage points)
    digits: int = 4
    short_digits: int = 3

    def value(self, v: float) -> str:
        """A value with its unit: "0.1234", "56.78%"."""
        return f"{v * self.scale:.{self.digits}f}{self.unit}"

    def short(self, v: float) -> str:
        """A narrow value, without unit: "0.123", "56.8"."""
        return f"{v * self.scale:.{self.short_digits}f}"

    def delta(self, v: float, digits: int | None = None) -> str:
        """A signed difference, without unit: "+0.0123", "-1.50"."""
        return f"{v * self.scale:+.{self.digits if digits is None else digits}f}"


@dataclass(frozen=True)
class Metric:
    """One held-out metric.

    ``example`` computes the metric's value for one scored record (``None``: the example has
    none, e.g. a generative example that was not decoded); ``pooling`` (:data:`PER_TOKEN` or
    :data:`MEAN`) says how a dataset's examples make its value and how the bootstrap resamples
    it. The texts default from ``label`` and the direction; ``order`` places its table columns.
    """

    name: str  # the key in dataset records, summaries and comparisons
    label: str  # for people: "held-out NLL", "accuracy"
    higher_is_better: bool
    example: Callable[[Mapping], float | None]
    pooling: str = MEAN
    fmt: Format = field(default_factory=Format)
    order: int = 100
    noun: str = ""  # in a difference's column: "Δ NLL" (default: the label)
    abbrev: str = ""  # in narrow columns: "acc" (default: the noun)
    better: str = ""  # how "A is better" reads: "P(A more accurate)" (default: "higher <noun>")
    title: str = ""  # the heading of the report's per-family table
    # The resample stream: a dataset's examples are drawn with the seed of (dataset name +
    # stream), the same for every model. Default "/<name>".
    stream: str | None = None
    # Reported (as None, "n/a") even where no dataset has a value: the keys every summary,
    # comparison and table had before metrics were registered.
    always: bool = False

    def __post_init__(self) -> None:
        if self.name in RESERVED or self.name.startswith("example_") or self.name.endswith("_ci"):
            raise ValueError(f"metric name {self.name!r} is a key records or summaries use")
        if self.pooling not in (PER_TOKEN, MEAN):
            raise ValueError(f"metric {self.name}: pooling must be {PER_TOKEN!r} or {MEAN!r}")
        noun = self.noun or self.label
        title = f"{self.label[:1].upper()}{self.label[1:]} per dataset family"
        defaults = {
            "noun": noun,
            "abbrev": self.abbrev or noun,
            "better": self.better or f"{self.direction} {noun}",
            "title": self.title or f"{title} ({self.direction} is better)",
            "stream": f"/{self.name}" if self.stream is None else self.stream,
        }
        for key, value in defaults.items():
            object.__setattr__(self, key, value)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def sign(self) -> float:
        """+1 when higher is better: ``sign * (a - b) > 0`` means A is better."""
        return 1.0 if self.higher_is_better else -1.0

    @property
    def direction(self) -> str:
        return "higher" if self.higher_is_better else "lower"

    def _pairs(self, records: Iterable[Mapping]) -> list[tuple[float, float]]:
        """(value, weight) of each example that has a value; the weight is its answer tokens
        (:data:`PER_TOKEN`) or 1."""
        per_token = self.pooling == PER_TOKEN
        return [
            (v, ex.get("tokens", 0) if per_token else 1)
            for ex in records
            if (v := self.example(ex)) is not None
        ]

    def observed(self, records: Sequence[Mapping]) -> float | None:
        """The metric of a dataset from its examples' scored records (``None`` without values).

        Plain Python sums for :data:`PER_TOKEN` and ``np.mean`` for :data:`MEAN`: the
        arithmetic scoring has always used, so recorded values stay bit for bit the same.
        """
        pairs = self._pairs(records)
        if not pairs:
            return None
        if self.pooling == PER_TOKEN:
            return sum(v for v, _ in pairs) / max(1, sum(w for _, w in pairs))
        return float(np.mean([v for v, _ in pairs]))

    def value(self, rec: Mapping) -> float | None:
        """A dataset's value: the one its record holds (scoring computed it from unrounded
        scores), else computed from its per-example arrays (a metric registered later)."""
        if self.name in rec:
            return rec[self.name]
        return self.observed(examples(rec))

    def values(self, rec: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """Per-example values and weights (answer tokens, or ones) of the examples that have a
        value, in example order: what the bootstrap resamples."""
        pairs = self._pairs(examples(rec))
        v = np.asarray([p[0] for p in pairs], dtype=np.float64)
        w = np.asarray([p[1] for p in pairs], dtype=np.float64)
        return v, w

    def has(self, rec: Mapping) -> bool:
        """Whether a dataset's record can be resampled for this metric."""
        v, w = self.values(rec)
        return len(v) > 0 and (self.pooling != PER_TOKEN or w.sum() > 0)

    def resampled(self, v: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The dataset's metric under each resample ``idx`` (samples × examples) of its values."""
        if self.pooling == PER_TOKEN:
            return v[idx].sum(1) / np.maximum(w[idx].sum(1), 1.0)
        return v[idx].mean(1)


METRICS: Registry[Metric] = Registry("metric", "merit.evaluate.metrics")


def examples(rec: Mapping) -> list[dict]:
    """One scored record per example of a dataset's record (see :data:`ARRAYS`)."""
    arrays = {f: rec.get(key) or () for f, key in ARRAYS.items()}
    out: list[dict] = [{} for _ in range(max(map(len, arrays.values())))]
    for f, values in arrays.items():
        for i, v in enumerate(values):
            out[i][f] = v
    return out


def resolve(m: str | Metric) -> Metric:
    """The registered metric ``m`` (a name), or ``m`` itself."""
    return m if isinstance(m, Metric) else METRICS.get(m)


def present(items: Iterable[Mapping | None]) -> list[Metric]:
    """The registered metrics that are a key of at least one of ``items`` (summaries,
    comparisons), in table order: the metrics a table shows."""
    keys = set().union(*(set(d) for d in items if d))
    return [m for m in METRICS if m.name in keys]


def headline(shown: Iterable[Metric]) -> Metric | None:
    """The :data:`HEADLINE` metric, if it is among ``shown``."""
    return next((m for m in shown if m.name == HEADLINE), None)
