"""The rows of `merit compare`: which runs each row needs, and where they live."""

from __future__ import annotations

from pathlib import Path

import pytest

from merit.compare.rows import check_rows, rows, unit_config
from merit.config import ConfigError, config_from_dict


def _cfg(**compare):
    return config_from_dict(
        {
            "run_dir": "/runs/x",
            "data": {"bigbench": "x", "split": {"train": 8, "validation": 2}},
            "planning": {"rank": 2},
            "training": {"learning_rate": 1e-4, "epochs": 1, "seed": 3},
            "compare": compare,
        }
    )


def test_every_row_has_units_for_every_seed():
    cfg = _cfg(seeds=[0, 1], random_draws=3, soup_runs=4, learning_rates=[0.5, 1, 2])
    by = {r.name: r for r in rows(cfg)}
    assert list(by) == list(cfg.compare.rows)
    assert len(by["base"].units) == 1  # θ0 has no seed
    assert len(by["random"].units) == 2 * 3 and len(by["soup"].units) == 2 * 4
    assert len(by["joint-lr"].units) == 2 * 3
    keys = [u.key for r in by.values() for u in r.units]
    # Shared units (joint in joint, shrink and joint-lr ×1) have one key; others are distinct.
    assert keys.count("joint-s0") == 3 and len(set(keys)) == len(keys) - 4
    draws = {u.overrides["planning.seed"] for u in by["random"].units}
    assert len(draws) == 6  # every draw its own split
    soup = {u.overrides["training.seed"] for u in by["soup"].units}
    assert len(soup) == 8 and all(u.overrides["training.epochs"] == 0.25 for u in by["soup"].units)
    assert by["joint-2ep"].units[0].overrides["training.epochs"] == 2
    assert [u.overrides.get("training.learning_rate") for u in by["joint-lr"].units[:3]] == [
        5e-5,
        None,  # the joint row itself
        2e-4,
    ]


def test_same_experiment_shares_the_compare_run_directory():
    cfg = _cfg(seeds=[3, 4])
    root = Path(cfg.run_dir)
    by = {r.name: r for r in rows(cfg)}
    where = {u.key: Path(unit_config(cfg, u, root).run_dir) for r in by.values() for u in r.units}
    # The compare config is MERIT-2D at training.seed 3: θ0, joint and MERIT-2D at seed 3 share it.
    assert where["base"] == root and where["joint-s3"] == root and where["merit-2d-s3"] == root
    assert where["merit-2d-s4"] == root / "compare" / "runs" / "merit-2d-s4"
    assert where["merit-1d-s3"] == root / "compare" / "runs" / "merit-1d-s3"
    u = by["merit-1d"].units[0]
    c = unit_config(cfg, u, root)
    assert c.planning.groups == 2 and c.evaluation.models == ["merged"]
    assert c.training.baselines == []  # branches only: joint is its own row
    j = unit_config(cfg, by["joint"].units[0], root)
    assert j.training.baselines == ["joint"] and j.evaluation.models == ["joint"]


@pytest.mark.parametrize(
    "compare, n, message",
    [
        ({"rows": ["base", "merit-3d"]}, 6, "merit-3d needs K=8 groups"),
        ({"rows": ["random"], "random_k": 5}, 4, "random needs K=5"),
        ({"rows": ["joint", "shrink"]}, 8, None),
        ({"rows": ["shrink"]}, 8, "add joint"),
    ],
)
def test_check_rows(compare, n, message):
    cfg = _cfg(**compare)
    if message is None:
        check_rows(cfg, n)
        return
    with pytest.raises(ConfigError, match=message):
        check_rows(cfg, n)


def test_a_validation_split_is_needed_to_choose():
    cfg = config_from_dict({"data": {"bigbench": "x"}, "compare": {"rows": ["joint", "joint-lr"]}})
    with pytest.raises(ConfigError, match="choose on a validation split"):
        check_rows(cfg, 8)
    with pytest.raises(ConfigError, match="must be smaller"):
        config_from_dict({"data": {"bigbench": "x", "split": {"train": 4, "validation": 4}}})
