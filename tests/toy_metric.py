"""A toy metric registered from outside merit, as a plugin would: each example's perplexity,
exp of its answer's mean NLL per token (lower is better). Importing this module registers it.

Named ``answer_ppl``: ``perplexity`` is already a summary field (exp of the average NLL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from merit.evaluate.metrics import MEAN, METRICS, Format, Metric


def answer_ppl(ex: Mapping) -> float | None:
    if ex.get("nll") is None or not ex.get("tokens"):
        return None
    return math.exp(ex["nll"] / ex["tokens"])


TOY = METRICS.register(
    Metric(
        name="answer_ppl",
        label="answer perplexity",
        abbrev="ppl",
        higher_is_better=False,
        example=answer_ppl,
        pooling=MEAN,
        fmt=Format(digits=3, short_digits=2),
        order=30,
    ),
    replace=True,
)
