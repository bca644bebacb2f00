"""A metric registered from outside merit (``tests/toy_metric.py``) reaches `merit evaluate`'s
results and printed table with no other change: scoring records it, the summary averages it with
a bootstrap interval, and the table gives it a column."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from conftest import write_run_config
from merit.cli import main
from merit.evaluate.metrics import METRICS


@pytest.fixture
def toy():
    # Imported here, not at the top: collecting this file must not register the toy for the
    # other tests of the session; the teardown removes it again.
    module = importlib.import_module("toy_metric")
    METRICS.register(module.TOY, replace=True)  # a second test: the module is already imported
    yield module.TOY
    METRICS.unregister(module.TOY.name)


def test_a_registered_metric_reaches_the_results_and_the_table(
    tmp_path, mixture_specs, tiny_base, toy, capsys
):
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tmp_path / "run",
        mixture_specs,
        tiny_base,
        # θ0 alone: nothing is trained, only scored.
        evaluation={"models": ["base"], "max_examples": 6, "max_generate": 2, "max_new_tokens": 4,
                    "batch_size": 16, "bootstrap_samples": 200},
    )  # fmt: skip
    assert main(["evaluate", str(cfg)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    base = res["models"]["base"]
    values = []
    for rec in base["datasets"].values():
        # exp of each example's mean NLL per answer token, averaged over the examples (the
        # recorded NLL is rounded to 5 decimals, scoring computed the metric before rounding).
        per_token = np.asarray(rec["example_nll"]) / np.asarray(rec["example_tokens"])
        assert rec[toy.name] == pytest.approx(float(np.mean(np.exp(per_token))), rel=1e-4)
        values.append(rec[toy.name])
    s = base["summary"]
    assert s[toy.name] == float(np.mean(values))
    lo, hi = s[f"{toy.name}_ci"]
    assert lo <= s[toy.name] <= hi
    assert s["perplexity"] == math.exp(s["nll"])  # the summary field of that name is untouched
    head, _, row = res["table"].splitlines()
    assert head == (
        "| model | held-out NLL ↓ (95% CI) | accuracy ↑ (95% CI) | answer perplexity ↓ (95% CI) "
        "| datasets |"
    )
    assert row.split(" | ")[3] == f"{s[toy.name]:.3f} [{lo:.2f}, {hi:.2f}]"
    assert res["table"] in printed
