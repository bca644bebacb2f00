"""What users add is one module: a toy stage and a toy compare row, registered by importing
their modules (as MERIT_PLUGINS does), run through the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import write_run_config
from merit.cli import main
from merit.compare.rows import ROWS
from merit.graph import STAGES


@pytest.fixture
def toys(monkeypatch):
    # MERIT_PLUGINS imports them (registering them) the first time; later tests re-register.
    monkeypatch.setenv("MERIT_PLUGINS", "toy_stage,toy_compare_row")
    import toy_compare_row
    import toy_stage

    STAGES.register(toy_stage.STAGE, replace=True)
    ROWS.register(toy_compare_row.ROW, replace=True)
    yield
    STAGES.unregister("group-shares")
    ROWS.unregister("joint-slow")


def _config(tmp_path, specs, base, **sections):
    return write_run_config(
        tmp_path / "run.yaml", tmp_path / "run", specs, base,
        training={"learning_rate": 3e-3, "batch_size": 8},
        evaluation={"max_examples": 4, "max_generate": 0, "batch_size": 16},
        **sections,
    )  # fmt: skip


def test_toy_stage_runs_through_the_cli_and_is_reused(
    tmp_path, mixture_specs, tiny_base, toys, capsys
):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    assert main(["group-shares", str(cfg)]) == 0
    out, err = capsys.readouterr()
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    want = [g["tokens"] / sum(x["tokens"] for x in plan["groups"]) for g in plan["groups"]]
    assert out.strip() == "shares: " + " ".join(f"{s:.4f}" for s in want)
    assert "plan: computing plan.json" in err and "group-shares: computing group shares" in err
    saved = json.loads((tmp_path / "run" / "group_shares.json").read_text())
    assert saved["shares"] == pytest.approx(want) and saved["stamp"]["inputs"]["plan"]
    # Nothing changed: reused. A changed plan setting re-runs the plan, then the toy stage.
    assert main(["group-shares", str(cfg)]) == 0
    assert "group-shares: reusing group shares" in capsys.readouterr().err
    other = _config(tmp_path, mixture_specs, tiny_base, planning={"splitter": "random"})
    assert main(["group-shares", str(other), f"run_dir={tmp_path / 'run2'}"]) == 0
    assert "group-shares: computing" in capsys.readouterr().err


def test_toy_compare_row_runs_through_the_cli(tmp_path, mixture_specs, tiny_base, toys, capsys):
    cfg = _config(tmp_path, mixture_specs, tiny_base, compare={"rows": ["joint", "joint-slow"]})
    assert main(["compare", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "Joint (half the learning rate)" in out
    res = json.loads((tmp_path / "run" / "compare" / "results.json").read_text())
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == {"joint", "joint-slow"}
    [unit] = rows["joint-slow"]["units"]
    assert unit["tokens"] == rows["joint"]["units"][0]["tokens"] > 0
    # The row trained its own model, at half the rate, in its own run directory.
    assert "joint-slow-s0" in unit["run_dir"]
    assert rows["joint-slow"]["summary"]["nll"] != rows["joint"]["summary"]["nll"]


def test_unknown_row_is_one_line(tmp_path, mixture_specs, tiny_base, capsys):
    cfg = _config(tmp_path, mixture_specs, tiny_base, compare={"rows": ["joint", "nope"]})
    assert main(["compare", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown row 'nope'" in err
