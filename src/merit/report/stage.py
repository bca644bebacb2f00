"""One self-contained page of a whole run."""

from __future__ import annotations

import time
from pathlib import Path

from merit.artifacts import read_json
from merit.diagnose.stage import diagnose
from merit.evaluate.stage import evaluate, needs_branches
from merit.plan.stage import make_plan
from merit.run import Run, record_timing


def report(run: Run) -> Path:
    """One self-contained HTML page (figures embedded) and a Markdown twin of the whole run:
    mixture, plan, branch curves, merge, diagnostics and the results table; ``report/``."""
    from merit.report.page import ReportData, build_report

    plan = make_plan(run)
    result = evaluate(run)  # trains and merges first
    merged = needs_branches(run)  # a row of `merit compare` may hold θ0 or joint training only
    diag = diagnose(run) if merged else None
    t0 = time.perf_counter()
    compare = run.paths.root / "compare"
    compared = (compare / "results.json").is_file()  # `merit compare` ran here
    joint_m = run.paths.manifest(run.paths.baseline("joint"))
    merge_m = run.paths.merged / "merge_manifest.json"
    rd = ReportData(
        title=f"merit report: {run.paths.root.resolve().name}",
        run_dir=str(run.paths.root),
        config=run.cfg.model_dump(mode="json"),
        data=read_json(run.paths.data) if run.paths.data.is_file() else None,
        plan=plan.to_json(),
        branches=[read_json(run.paths.manifest(run.paths.branch(g.id))) for g in plan.groups]
        if merged
        else [],
        joint=read_json(joint_m) if joint_m.is_file() else None,
        merge=read_json(merge_m) if merge_m.is_file() else None,
        evaluation=result.models,
        comparisons=result.comparisons,
        diagnostics=diag,
        comparison=read_json(compare / "results.json") if compared else None,
        comparison_figure=(compare / "gain.png").read_bytes() if compared else None,
        timings=read_json(run.paths.timings) if run.paths.timings.is_file() else {},
    )
    html_path, _ = build_report(rd, run.paths.report)
    record_timing(run, "report", time.perf_counter() - t0)
    return html_path
