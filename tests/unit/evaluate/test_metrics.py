"""The metric registry: the built-ins reproduce the statistics computed before metrics were
registered, bit for bit, and a metric registered later works from the recorded examples."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from merit.evaluate.metrics import (
    HEADLINE,
    MEAN,
    METRICS,
    Format,
    Metric,
    examples,
    present,
)
from merit.evaluate.statistics import (
    bootstrap_ci,
    markdown_table,
    paired_bootstrap,
    summarize,
    with_intervals,
)


def _per(seed: int, shift: float = 0.0, n: int = 25) -> dict[str, dict]:
    """Records as scoring writes them: multiple choice judged on every example, generative on
    the first five, one generative dataset never decoded."""
    rng = np.random.default_rng(seed)
    per = {}
    for d in range(5):
        tok = rng.integers(1, 9, n).tolist()
        nll = [round(float(x), 5) for x in (rng.uniform(0.5, 3, n) + shift) * np.array(tok)]
        rec = {"kind": "generative", "n": n, "nll": sum(nll) / sum(tok)}
        rec.update(example_nll=nll, example_tokens=tok)
        judged = n if d % 2 else (5 if d < 4 else 0)
        if judged:
            hits = (rng.random(judged) < 0.3 + 0.1 * d).astype(int).tolist()
            rec.update(accuracy=float(np.mean(hits)), example_correct=hits)
        per[f"ds{d}"] = rec
    return per


# -- the statistics as computed before metrics were registered: the reference ------------------
def _idx(name: str, n: int, samples: int, seed: int) -> np.ndarray:
    key = int.from_bytes(
        hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little"
    )
    return np.random.default_rng([key, n]).integers(0, n, size=(samples, n))


def _old_resamples(per: dict, names: list[str], metric: str, samples: int, seed: int):
    acc = np.zeros(samples)
    for name in names:
        rec = per[name]
        if metric == "nll":
            nll = np.asarray(rec["example_nll"], dtype=np.float64)
            tok = np.asarray(rec["example_tokens"], dtype=np.float64)
            idx = _idx(name, len(nll), samples, seed)
            acc += nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0)
        else:
            hits = np.asarray(rec["example_correct"], dtype=np.float64)
            acc += hits[_idx(name + "/accuracy", len(hits), samples, seed)].mean(1)
    return acc / max(1, len(names))


def _old_has(rec: dict, metric: str) -> bool:
    if metric == "nll":
        return bool(rec.get("example_tokens")) and sum(rec["example_tokens"]) > 0
    return bool(rec.get("example_correct"))


def _old_ci(per, metric, samples, confidence, seed):
    names = [n for n, r in per.items() if _old_has(r, metric)]
    x = _old_resamples(per, names, metric, samples, seed)
    lo, hi = np.quantile(x, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


# -----------------------------------------------------------------------------------------------
def test_built_ins_are_registered_in_table_order():
    assert METRICS.names()[:2] == ("nll", "accuracy")
    nll, acc = METRICS.get("nll"), METRICS.get("accuracy")
    assert not nll.higher_is_better and acc.higher_is_better and HEADLINE == "accuracy"
    assert (nll.arrow, nll.better, acc.arrow, acc.better) == (
        "↓",
        "lower NLL",
        "↑",
        "more accurate",
    )
    assert "exact_match" not in METRICS  # exact match is how generations count as accurate
    assert acc.fmt.value(0.5) == "50.00%" and nll.fmt.value(1.23456) == "1.2346"
    with pytest.raises(ValueError, match="summaries use"):
        Metric("perplexity", "perplexity", False, lambda ex: None)


def test_summaries_and_intervals_equal_the_statistics_before_the_registry():
    per = _per(0)
    s = with_intervals(per, 400, 0.9, 7)
    nll = [r["nll"] for r in per.values()]
    acc = [r["accuracy"] for r in per.values() if "accuracy" in r]
    assert list(s) == ["nll", "accuracy", "datasets", "perplexity", "nll_ci", "accuracy_ci",
                       "confidence"]  # fmt: skip
    assert s["nll"] == float(np.mean(nll)) and s["accuracy"] == float(np.mean(acc))
    assert s["perplexity"] == float(math.exp(np.mean(nll)))
    for metric in ("nll", "accuracy"):
        want = _old_ci(per, metric, 400, 0.9, 7)
        assert bootstrap_ci(per, metric, 400, 0.9, 7) == want  # bit for bit
        assert s[f"{metric}_ci"] == list(want)


def test_paired_comparisons_equal_the_statistics_before_the_registry():
    a, b = _per(0), _per(1, shift=0.2)
    for metric, sign in (("nll", -1.0), ("accuracy", 1.0)):
        got = paired_bootstrap(a, b, metric, 300, 0.95, 3)
        names = [n for n in a if _old_has(a[n], metric) and _old_has(b[n], metric)]
        diff = _old_resamples(a, names, metric, 300, 3) - _old_resamples(b, names, metric, 300, 3)
        lo, hi = np.quantile(diff, [(1 - 0.95) / 2, (1 + 0.95) / 2])
        obs_a = float(np.mean([a[n][metric] for n in names]))
        obs_b = float(np.mean([b[n][metric] for n in names]))
        assert got["ci"] == [float(lo), float(hi)] and got["difference"] == obs_a - obs_b
        assert got["p_a_better"] == float(np.mean(sign * diff > 0))
        assert got["datasets"] == len(names) == (5 if metric == "nll" else 4)


def test_examples_align_the_per_example_arrays():
    rec = {"example_nll": [2.0, 3.0, 4.0], "example_tokens": [1, 2, 4], "example_correct": [1]}
    assert examples(rec) == [
        {"nll": 2.0, "tokens": 1, "correct": 1},
        {"nll": 3.0, "tokens": 2},
        {"nll": 4.0, "tokens": 4},
    ]
    assert METRICS.get("nll").observed(examples(rec)) == 9.0 / 7
    assert METRICS.get("accuracy").observed(examples(rec)) == 1.0
    assert examples({}) == []


@pytest.fixture
def longest():
    """A metric registered after scoring: the share of examples with answers over 4 tokens."""
    m = Metric(
        "long_answers", "long answers", True, lambda ex: float(ex["tokens"] > 4), pooling=MEAN,
        fmt=Format(scale=100, unit="%", digits=1, short_digits=0), order=25,
    )  # fmt: skip
    METRICS.register(m)
    yield m
    METRICS.unregister(m.name)


def test_a_later_metric_is_computed_from_the_recorded_examples(longest):
    per = _per(0)
    s = with_intervals(per, 200, 0.95, 0)
    want = [np.mean([t > 4 for t in r["example_tokens"]]) for r in per.values()]
    assert s["long_answers"] == pytest.approx(np.mean(want))
    assert s["long_answers_ci"][0] <= s["long_answers"] <= s["long_answers_ci"][1]
    assert [m.name for m in present([s])] == ["nll", "accuracy", "long_answers"]
    head = markdown_table({"base": s}).splitlines()[0]
    assert head == (
        "| model | held-out NLL ↓ (95% CI) | accuracy ↑ (95% CI) | long answers ↑ (95% CI) "
        "| datasets |"
    )
    # Without values anywhere it is left out, while the built-ins are always reported.
    empty = summarize({"x": {"kind": "generative", "n": 0}})
    assert "long_answers" not in empty and empty["nll"] is None and empty["accuracy"] is None
