"""Held-out NLL: the mean negative log-likelihood per answer token (lower is better).

The answer tokens are those the chat template puts after the generation prompt. A dataset's NLL
is the sum of its examples' NLL over the sum of their answer tokens, so a long answer weighs
what its tokens weigh; the bootstrap resamples examples and recomputes that ratio.
"""

from __future__ import annotations

from collections.abc import Mapping

from merit.evaluate.metrics import METRICS, PER_TOKEN, Format, Metric


def _example(ex: Mapping) -> float | None:
    return ex.get("nll")  # summed over the answer's tokens; weighed by ex["tokens"]


NLL = METRICS.register(
    Metric(
        name="nll",
        label="held-out NLL",
        noun="NLL",
        higher_is_better=False,
        example=_example,
        pooling=PER_TOKEN,
        fmt=Format(digits=4, short_digits=3),
        order=10,
        title="Held-out NLL per answer token, per dataset family (lower is better)",
        stream="",  # resampled with the dataset's own seed, as before metrics were registered
        always=True,
    )
)
