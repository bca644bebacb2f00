"""Verdicts per premise, found by stable keys, and the diagnostics artifact that carries them."""

from __future__ import annotations

import json

from merit.diagnose.artifact import Diagnostics
from merit.diagnose.verdicts import PREMISES, VERDICT_KEYS, Thresholds, overall, verdicts


def _diag(barrier: float, joint: float, rise: float, meas: float, pred: float) -> dict:
    return {
        "barriers": [{"kind": "branches", "label": "0–1", "barrier": barrier, "ends": [2.0, 2.0]}],
        "distances": {"merged": 1.0, "joint": joint},
        "perturbation": {
            "reference_index": 1,
            "merged": {"mean": [2.0, 2.0 * (1 + rise)], "loss": 2.0},
        },
        "generalization": {
            "merged": {"train": 1.9, "heldout": 2.0},
            "joint": {"train": 1.5, "heldout": 2.1},
        },
        "gain": {"measured": meas, "predicted": pred, "weights": [0.5, 0.5], "eigen_split": []},
    }


def test_verdicts_follow_the_thresholds():
    good = verdicts(_diag(0.001, 2.6, 0.01, 0.02, 0.021), Thresholds())
    assert [v["holds"] for v in good] == [True, True, True, True, True, None]  # no alignment
    assert overall(good).startswith("θ0 is merge-ready")
    bad = verdicts(_diag(0.5, 1.1, 0.3, 0.02, 0.05), Thresholds())
    assert [v["holds"] for v in bad] == [False, False, False, True, False, None]
    aligned = {"targets_curvature": False, "line": "the split does not target ... (z = 0.4)"}
    assert (
        verdicts({**_diag(0.5, 1.1, 0.3, 0.02, 0.05), "alignment": aligned})[-1]["holds"] is False
    )
    assert "barrier" in overall(bad) and "not merge-ready" in overall(bad)
    assert all(v["why"] for v in bad)


def test_verdict_keys_are_unique_stable_and_cover_every_premise():
    # Stored in diagnostics.json and looked up by code: renaming one breaks old files.
    assert VERDICT_KEYS == (
        "one_basin",
        "near_theta0",
        "flat_basin",
        "generalises",
        "gain_is_variance",
        "targets_curvature",
    )
    assert len(set(VERDICT_KEYS)) == len(VERDICT_KEYS)
    for diag in (_diag(0.001, 2.6, 0.01, 0.02, 0.021), {}):  # judged, and nothing to judge
        out = verdicts(diag)
        assert [v["key"] for v in out] == list(VERDICT_KEYS)
        assert [v["premise"] for v in out] == [PREMISES[k] for k in VERDICT_KEYS]
    assert all(v["holds"] is None for v in verdicts({}))
    assert overall(verdicts({})).startswith("not enough")


def test_overall_reads_the_basin_premises_by_key_not_by_position_or_prose():
    items = verdicts(_diag(0.001, 2.6, 0.3, 0.02, 0.021))  # flat basin fails, rest holds
    reordered = [{**v, "premise": v["premise"].upper()} for v in reversed(items)]
    assert overall(reordered) == overall(items)
    assert "sharp" in overall(reordered)


def test_diagnostics_round_trip_and_old_files_get_verdict_keys():
    rec = {
        "parameters": 10,
        "losses": {"θ0": 2.0, "θ̄": 1.9},
        **_diag(0.001, 2.6, 0.01, 0.02, 0.021),
        "evaluations": 7,
        "hvps": 2,
        "timings": {"losses": 0.1},
        "examples": {"heldout": 4},
        "alignment": {},
        "stamp": {"version": 1},
    }
    rec["verdicts"] = verdicts(rec)
    rec["overall"] = overall(rec["verdicts"])
    d = Diagnostics.from_json(json.loads(json.dumps(rec)))
    assert d.to_json() == rec
    assert d.verdict("flat_basin")["holds"] is True and d.verdict("nonexistent") is None
    # A file written before verdicts had keys: the first five premises, in the same order.
    five = rec["verdicts"][:5]
    old = {**rec, "verdicts": [{k: v for k, v in x.items() if k != "key"} for x in five]}
    assert Diagnostics.from_json(old).verdicts == five
