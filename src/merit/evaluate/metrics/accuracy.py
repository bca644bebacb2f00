"""Accuracy: the share of held-out examples answered correctly (higher is better).

Whether an example is correct is decided where it is scored. Multiple choice: every option is
scored as if it were the answer and the option of highest *mean* log-probability per answer
token wins (:func:`choose`; summed log-likelihood favours short options, so the unnormalised
winner is only kept alongside). Generative: exact match of the greedy decode after BIG-bench's
post-processing (:mod:`merit.evaluate.metrics.exact_match`), on the first
``evaluation.max_generate`` examples. Both kinds are one hit rate under the key ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Mapping

from merit.evaluate.metrics import MEAN, METRICS, Format, Metric


def choose(scores: Mapping[int, tuple[float, int]]) -> tuple[int, int]:
    """The winning option of a multiple-choice question from each option's (summed
    log-probability, answer tokens): by mean log-probability per token, and unnormalised."""
    best = max(scores, key=lambda c: scores[c][0] / max(1, scores[c][1]))
    raw = max(scores, key=lambda c: scores[c][0])
    return best, raw


def _example(ex: Mapping) -> float | None:
    return ex.get("correct")  # 0/1; absent for a generative example that was not decoded


ACCURACY = METRICS.register(
    Metric(
        name="accuracy",
        label="accuracy",
        abbrev="acc",
        better="more accurate",
        higher_is_better=True,
        example=_example,
        pooling=MEAN,
        fmt=Format(scale=100, unit="%", delta_unit="pt", digits=2, short_digits=1),
        order=20,
        title="Accuracy (%) per dataset family",
        always=True,
    )
)
