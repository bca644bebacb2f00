"""One self-contained page of a whole run."""

from __future__ import annotations

from dataclasses import dataclass

from merit.artifacts import Artifact, read_json
from merit.calibrate.sensitivity import Sensitivity
from merit.config import RunConfig
from merit.evaluate.stage import needs_branches
from merit.graph import STAGES, Context, Stage
from merit.report.page import ReportData, build_report
from merit.train.artifact import BranchManifest


@dataclass
class Report(Artifact):
    """``report/report.json``: where the page and its Markdown twin are."""

    html: str
    markdown: str


def needs(cfg: RunConfig) -> tuple[str, ...]:
    # A row of `merit compare` may hold θ0 or joint training only: no branches to diagnose.
    merged = ("train", "merge", "diagnose") if needs_branches(cfg) else ()
    return ("data", "plan", "evaluate", *merged)


def _manifest(ctx: Context, job_dir) -> BranchManifest | None:
    return BranchManifest.load_if(ctx.paths.manifest(job_dir))


def build(ctx: Context, inputs: dict) -> Report:
    """One self-contained HTML page (figures embedded) and a Markdown twin of the whole run:
    mixture, plan, branch curves, merge, diagnostics and the results table; ``report/``."""
    plan, result = inputs["plan"], inputs["evaluate"]
    # `merit compare` ran here: its results as written (compare sits above the report's stage).
    at = ctx.paths.compare_results
    compared = read_json(at) if at.is_file() else None
    figure = ctx.paths.compare / "gain.png"
    merge = inputs.get("merge")
    rd = ReportData(
        title=f"merit report: {ctx.paths.root.resolve().name}",
        run_dir=str(ctx.paths.root),
        config=ctx.cfg.model_dump(mode="json"),
        data=inputs["data"],
        plan=plan,
        branches=[_manifest(ctx, ctx.paths.branch(g.id)) for g in plan.groups] if merge else [],
        joint=_manifest(ctx, ctx.paths.baseline("joint")),
        merge=merge,
        evaluation=result.models,
        comparisons=result.comparisons,
        diagnostics=inputs.get("diagnose"),
        comparison=compared,
        comparison_figure=figure.read_bytes() if compared and figure.is_file() else None,
        timings=read_json(ctx.paths.timings) if ctx.paths.timings.is_file() else {},
        sensitivity=Sensitivity.load_if(ctx.paths.sensitivity),  # `merit sensitivity` ran here
    )
    html, md = build_report(rd, ctx.paths.report)
    return Report(str(html), str(md))


STAGES.register(
    Stage(
        name="report",
        help="one self-contained HTML page (and Markdown) of the whole run",
        reads=(),
        needs=needs,
        artifact=Report,
        path=lambda p: p.report_record,
        build=build,
        what="the report",
        always=True,
        show=lambda _ctx, r: f"report -> {r.html} (and {r.markdown})",
        order=80,
    )
)
