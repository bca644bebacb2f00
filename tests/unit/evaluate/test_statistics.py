"""Statistics of evaluated models: dataset averages, the (paired) bootstrap, and tables that
address models by key and show them by label."""

import copy

import numpy as np
import pytest

from merit.evaluate.statistics import (
    bootstrap_ci,
    compare_models,
    comparison_table,
    markdown_table,
    paired_bootstrap,
    summarize,
    with_intervals,
)


def _per(rates, n=40, seed=0, nll=1.0):
    """Per-dataset records of a model whose accuracy on dataset d is about rates[d]."""
    rng = np.random.default_rng(seed)
    per = {}
    for d, rate in enumerate(rates):
        hits = (rng.random(n) < rate).astype(int).tolist()
        per[f"ds{d}"] = {
            "nll": nll,
            "accuracy": float(np.mean(hits)),
            "example_correct": hits,
            "example_nll": [nll] * n,
            "example_tokens": [1] * n,
        }
    return per


def test_bootstrap_interval_brackets_the_average_and_is_reproducible():
    rng = np.random.default_rng(0)
    per = {}
    for d in range(6):
        hits = (rng.random(40) < 0.3 + 0.1 * d).astype(int).tolist()
        per[f"ds{d}"] = {
            "nll": 1.0,
            "accuracy": float(np.mean(hits)),
            "example_correct": hits,
            "example_nll": [1.0] * 40,
            "example_tokens": [1] * 40,
        }
    avg = summarize(per)["accuracy"]
    lo, hi = bootstrap_ci(per, "accuracy", samples=2000)
    assert lo < avg < hi and hi - lo < 0.2
    assert bootstrap_ci(per, "accuracy", samples=2000) == (lo, hi)
    # A constant metric has no uncertainty.
    assert bootstrap_ci(per, "nll", samples=200) == (1.0, 1.0)
    # Evaluated on different examples: refused, not silently compared.
    other = copy.deepcopy(per)
    other["ds0"]["example_correct"] = other["ds0"]["example_correct"][:10]
    with pytest.raises(ValueError, match="different examples"):
        paired_bootstrap(per, other, "accuracy")


def test_models_are_compared_by_key_and_shown_by_label():
    per = {
        "base": _per([0.2, 0.3, 0.4], seed=0, nll=2.0),
        "merged": _per([0.6, 0.7, 0.8], seed=1, nll=1.5),
        "joint": _per([0.5, 0.6, 0.7], seed=2, nll=1.6),
    }
    pairs = compare_models(per, "merged", samples=300)
    assert list(pairs) == ["base", "joint"]  # keyed by the other model's key
    for key, row in pairs.items():
        assert row["reference"] == "merged" and row["other"] == key
        assert row["accuracy"] == paired_bootstrap(per["merged"], per[key], "accuracy", 300)
        assert row["nll"]["difference"] == pytest.approx(1.5 - per[key]["ds0"]["nll"])
    with pytest.raises(KeyError, match="reference"):
        compare_models(per, "MERIT K=4")
    labels = {"base": "θ0 (base)", "merged": "MERIT K=4"}
    table = comparison_table(pairs, labels)
    assert "| MERIT K=4 vs θ0 (base) |" in table
    assert "| MERIT K=4 vs joint |" in table  # no label: the key
    assert "| merged vs base |" in comparison_table(pairs)
    # Rows made elsewhere, without reference/other, are shown under their key.
    metrics_only = {k: v for k, v in pairs["base"].items() if k in ("nll", "accuracy")}
    assert "| A vs B |" in comparison_table({"A vs B": metrics_only}, labels)
    summaries = {k: with_intervals(v, 200, 0.9, 0) for k, v in per.items()}
    md = markdown_table(summaries, labels)
    rows = md.strip().split("\n")[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["θ0 (base)", "MERIT K=4", "joint"]
    assert "(90% CI)" in md.split("\n")[0]
    assert markdown_table(summaries).split("\n")[2].startswith("| base |")
