"""The comparison's statistics: pooling units, paired differences from joint, the table."""

from __future__ import annotations

import numpy as np
import pytest

from merit.compare.results import claims, family_means, pool, summarise, table


def _rec(nll: list[float], correct: list[int], tokens: int = 4) -> dict:
    return {
        "kind": "multiple_choice",
        "n": len(nll),
        "example_nll": [x * tokens for x in nll],
        "example_tokens": [tokens] * len(nll),
        "nll": float(np.mean(nll)),
        "example_correct": correct,
        "accuracy": float(np.mean(correct)),
    }


def test_pool_averages_each_example_over_units():
    a = {"fam__x": _rec([1.0, 3.0], [1, 0])}
    b = {"fam__x": _rec([2.0, 5.0], [1, 1])}
    p = pool([a, b])["fam__x"]
    assert p["example_nll"] == [6.0, 16.0]
    assert p["example_correct"] == [1.0, 0.5]
    assert p["nll"] == pytest.approx(2.75) and p["accuracy"] == pytest.approx(0.75)
    assert pool([a]) == a


def test_paired_difference_is_row_minus_joint():
    rng = np.random.default_rng(0)
    base = {f"t{i}": _rec(list(rng.uniform(1, 2, 6)), [1, 0, 1, 0, 1, 0]) for i in range(4)}
    better = {k: _rec([x / 4 - 0.5 for x in v["example_nll"]], [1] * 6) for k, v in base.items()}
    per = {"joint": base, "merit-2d": better}
    s = summarise(per, {}, (200, 0.95, 0))
    d = s["merit-2d"]["vs_joint"]["nll"]
    assert d["difference"] == pytest.approx(
        s["merit-2d"]["summary"]["nll"] - s["joint"]["summary"]["nll"]
    )
    assert d["difference"] == pytest.approx(-0.5)
    assert d["ci"][0] <= d["difference"] <= d["ci"][1] and d["ci"][1] < 0
    assert d["p_a_better"] == 1.0 and d["wins"] == 4 and d["losses"] == 0
    assert s["joint"]["vs_joint"] is None and s["merit-2d"]["unseen_summary"] is None
    acc = s["merit-2d"]["vs_joint"]["accuracy"]
    assert acc["difference"] == pytest.approx(0.5)


def test_family_means_and_table_cells():
    per = {"a__1": _rec([1.0], [1]), "a__2": _rec([3.0], [0]), "b": _rec([5.0], [1])}
    assert family_means(per) == {"a": 2.0, "b": 5.0}
    rows = [
        {"label": "θ0", "budget": 0, "steps": None, "distance": 0.0, "train_loss": 2.0,
         "summary": {"nll": 3.0, "nll_ci": [2.5, 3.5], "accuracy": 0.5, "accuracy_ci": None},
         "vs_joint": None, "unseen_summary": None, "unseen_vs_joint": None,
         "families": {"a": 2.0, "b": 5.0}},
    ]  # fmt: skip
    md = table(rows).splitlines()
    assert md[0].split("|")[1:-1][-2:] == [" a NLL ", " b NLL "]
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert cells[:7] == ["θ0", "0.00", "–", "0", "2.000", "3.000 [2.500, 3.500]", "50.0"]
    assert cells[-2:] == ["2.000", "5.000"]
    rows[0]["steps"] = [16, 64]  # the fewest and most optimizer steps of the row's jobs
    assert [c.strip() for c in table(rows).splitlines()[2].strip("|").split("|")][2] == "16–64"


def _per(shift: float, n_tasks: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"t{i}": _rec(list(rng.uniform(1, 2, 8) + shift), [1, 0] * 4) for i in range(n_tasks)}


def test_claims_follow_the_paired_intervals():
    stats = (300, 0.95, 0)
    # NLL falling along the paper's order, by clear margins: the ordering holds.
    per = {k: _per(-0.3 * i) for i, k in enumerate(["joint", "random", "merit-1d", "merit-2d"])}
    per["soup"] = _per(-0.3)  # as random
    diag = {"distance_ratio": 2.5, "train_loss_gap": 0.1, "heldout_nll_gap": -0.2}
    got = {c["claim"]: c["verdict"] for c in claims(per, {}, diag, stats)}
    assert got["ordering joint < random < merit-1d < merit-2d (held-out examples)"] == "held"
    assert got["random split ≈ uniform soup (held-out examples)"] == "held"
    assert got["merit-2d beats joint training (held-out examples)"] == "held"
    assert got["the merge is 2.4–2.9× closer to θ0 than joint training"] == "held"
    assert got["higher train loss than joint training, yet no worse held out"] == "held"
    # MERIT worse than joint: the margin claim fails, and one reversed step fails the ordering.
    per["merit-2d"] = _per(+0.5)
    diag = {"distance_ratio": 4.0, "train_loss_gap": 0.1, "heldout_nll_gap": 0.3}
    got = {c["claim"]: c["verdict"] for c in claims(per, per, diag, stats)}
    assert got["merit-2d beats joint training (unseen tasks)"] == "did not hold"
    assert got["ordering joint < random < merit-1d < merit-2d (unseen tasks)"] == "did not hold"
    assert got["the merge is 2.4–2.9× closer to θ0 than joint training"] == "did not hold"
    # Identical rows: nothing can be decided.
    same = {k: _per(0.0) for k in ["joint", "merit-1d"]}
    (c, _m) = claims(same, {}, {}, stats)
    assert c["verdict"] == "could not be decided"


def test_each_merge_of_merit_2d_is_tested_against_joint_the_control_and_random_branches():
    stats = (300, 0.95, 0)
    per = {"joint": _per(0.0), "shrink": _per(-0.5), "merit-2d+ta": _per(-0.3),
           "random+ta": _per(-0.3), "merit-2d+ties": _per(-0.8)}  # fmt: skip
    got = {c["claim"]: c for c in claims(per, {}, {}, stats)}
    assert got["merit-2d+ta beats joint training (held-out examples)"]["verdict"] == "held"
    assert got["merit-2d+ta beats the shrinkage control (held-out examples)"]["verdict"] == (
        "did not hold"
    )
    assert got["merit-2d+ta beats the same merge of random branches (held-out examples)"][
        "verdict"] == "could not be decided"  # fmt: skip
    ties = got["merit-2d+ties beats the shrinkage control (held-out examples)"]
    assert ties["verdict"] == "held" and ties["detail"].startswith("ΔNLL -0.300")
    assert not any("random+ties" in c for c in got)  # no random+ties row: no such claim
