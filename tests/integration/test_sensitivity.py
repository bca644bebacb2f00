"""``merit sensitivity``: the calibration-size curve from the calibration's part sketches against
a larger reference, on the tiny θ0."""

from __future__ import annotations

import json

from conftest import write_run_config
from merit.cli import main


def test_the_curve_rises_with_n_and_names_where_it_saturates(tmp_path, mixture_specs, tiny_base,
                                                              capsys):  # fmt: skip
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base,
                           diagnostics={"sensitivity_datasets": 3, "sensitivity_draws": 10})  # fmt: skip
    assert main(["sensitivity", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "calibration size: n = " in out and "reaches 95% of the cosine" in out
    s = json.loads((tmp_path / "run" / "calibration" / "sensitivity.json").read_text())
    assert len(s["curves"]) == 3 and set(s["reference_examples"].values()) == {24}
    mean = [p["mean"] for p in s["mean_curve"]]
    assert [p["n"] for p in s["mean_curve"]] == list(range(1, 9))  # 8 parts of 1 example each
    # More samples agree better with the reference, in expectation (averaged over draws and
    # datasets): the curve rises from one example to all eight.
    assert mean[-1] > mean[0] and mean[-1] > 0
    assert s["recommendation"]["n"] <= 8
    assert (tmp_path / "run" / "calibration" / "sensitivity.png").stat().st_size > 1000
    assert main(["report", str(cfg)]) == 0
    page = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Calibration size" in page and "figures/sensitivity.png" in page
    # Changing a sensitivity setting re-runs it alone: the calibration is reused.
    cal = (tmp_path / "run" / "calibration" / "sketches.safetensors").stat().st_mtime_ns
    assert main(["sensitivity", str(cfg), "diagnostics.sensitivity_draws=3"]) == 0
    assert (tmp_path / "run" / "calibration" / "sketches.safetensors").stat().st_mtime_ns == cal


def test_one_calibration_part_is_an_explanation_not_a_crash(tmp_path, mixture_specs, tiny_base,
                                                             capsys):  # fmt: skip
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base,
                           calibration={"microbatches": 1})  # fmt: skip
    assert main(["sensitivity", str(cfg)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("calibration size: no curve with calibration.microbatches = 1")
