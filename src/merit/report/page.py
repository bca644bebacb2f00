"""The run report: one self-contained HTML page (figures embedded) and its Markdown twin.

Sections follow the pipeline: the mixture, the plan (conflict matrix ordered by group, the PCA
map), each branch's loss curve, the merge, the diagnostics of the paper's premises (§4), and the
results tables laid out like the paper's (one per registered metric: one row per model, one
column per dataset family, the dataset average with its bootstrap interval), then paired
comparisons. Each section is one function writing into a
:class:`merit.report.document.Document`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from merit.calibrate.sensitivity import Sensitivity, sensitivity_figure
from merit.compare.results import table_cells
from merit.data.artifact import DataRecord
from merit.diagnose.artifact import Diagnostics
from merit.diagnose.figures import diagnostic_figures
from merit.evaluate.metrics import Metric, headline, present
from merit.merge.manifest import MergeManifest
from merit.overhead import overhead
from merit.plan.artifact import Plan, PlanGroup
from merit.report.document import Document, write_documents
from merit.report.figures import (
    coefficients_figure,
    loss_curve_figure,
    mixture_figure,
    plan_figures,
)
from merit.report.tables import (
    best_cells,
    cell,
    comparison_title,
    family,
    family_table,
    model_label,
    model_order,
)
from merit.train.artifact import BranchManifest

NAV = (
    ("summary", "Summary"),
    ("mixture", "Mixture"),
    ("plan", "Plan"),
    ("sensitivity", "Calibration size"),
    ("branches", "Branches"),
    ("merge", "Merge"),
    ("diagnostics", "Diagnostics"),
    ("results", "Results"),
    ("comparison", "Comparison"),
)


@dataclass
class ReportData:
    """Everything the report shows, read from a run directory by
    :func:`merit.report.stage.report`. ``evaluation`` is keyed by model key (see
    :mod:`merit.report.tables`)."""

    title: str
    run_dir: str
    config: dict
    data: DataRecord | None
    plan: Plan
    branches: list[BranchManifest]
    joint: BranchManifest | None = None
    merge: MergeManifest | None = None
    evaluation: dict[str, dict] = field(default_factory=dict)
    comparisons: dict[str, dict] = field(default_factory=dict)
    diagnostics: Diagnostics | None = None
    comparison: dict | None = None  # compare/results.json, when `merit compare` ran here
    comparison_figure: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sensitivity: Sensitivity | None = None  # calibration/sensitivity.json, when computed


def page_metrics(items: Iterable[Mapping | None]) -> list[Metric]:
    """The registered metrics that ``items`` (summaries, comparisons) have, in the page's order:
    the headline metric first, then the others in table order."""
    shown = present(items)
    lead = headline(shown)
    return ([lead] if lead else []) + [m for m in shown if m is not lead]


def _kpis(rd: ReportData) -> list[tuple[str, str]]:
    plan, ev = rd.plan, rd.evaluation
    kpis = [
        (str(len(plan.datasets)), "datasets"),
        (f"K = {plan.K}", f"branches from r = {plan.rank} axes"),
    ]
    if "merged" in ev and "joint" in ev:
        merged, joint = ev["merged"]["summary"], ev["joint"]["summary"]
        for m in page_metrics([merged, joint]):
            a, b = merged.get(m.name), joint.get(m.name)
            if a is not None and b is not None:
                unit = f" {m.fmt.delta_unit}" if m.fmt.delta_unit else ""
                txt = m.fmt.delta(a - b) + unit
                kpis.append((txt, f"MERIT − joint, {m.label} ({m.direction} is better)"))
    ratio = rd.diagnostics.distances.get("ratio_joint_merged") if rd.diagnostics else None
    if ratio:
        kpis.append((f"{ratio:.2f}×", "joint's distance / θ̄'s"))
    return kpis


def summary_section(doc: Document, rd: ReportData) -> None:
    with doc.section("summary", "Summary"):
        kpis = _kpis(rd)
        doc.raw_html(
            '<div class="kpis">'
            + "".join(
                f'<div class="kpi"><b>{html.escape(v)}</b><span>{html.escape(t)}</span></div>'
                for v, t in kpis
            )
            + "</div>"
        )
        doc.md.append("\n".join(f"- **{v}** {t}" for v, t in kpis) + "\n")
        if rd.diagnostics and rd.diagnostics.overall:
            doc.raw_html(f'<p class="overall">{html.escape(rd.diagnostics.overall)}</p>')
            doc.md.append(f"**{rd.diagnostics.overall}**\n")
        model_path = rd.config.get("model", {}).get("path", "?")
        doc.p(
            f"Run directory {rd.run_dir}; θ0 = {model_path}. Every number on this page is read "
            "from the run's artifacts; held-out data were never used to choose anything.",
            "muted",
        )


def mixture_section(doc: Document, rd: ReportData) -> None:
    with doc.section("mixture", "The mixture"):
        if not rd.data:
            return
        rows = rd.data.datasets
        formats: dict[str, int] = {}
        for r in rows:
            formats[r["format"]] = formats.get(r["format"], 0) + 1
        tot = {s: sum(r["splits"][s] for r in rows) for s in ("train", "calibration", "eval")}
        tokens = sum(r["train_tokens"] for r in rows)
        doc.p(
            f"{len(rows)} datasets in {len({family(r['name']) for r in rows})} families "
            f"({', '.join(f'{v} {f}' for f, v in sorted(formats.items()))}); "
            f"{tot['train']} train, {tot['calibration']} calibration and {tot['eval']} held-out "
            f"examples; {tokens:,} train tokens."
        )
        figure = mixture_figure(rd.data.to_json(), rd.plan.to_json())
        doc.fig("mixture", figure, "Train tokens per dataset family")


def sensitivity_section(doc: Document, s: Sensitivity | None) -> None:
    """How many calibration samples the representative gradients need (``merit sensitivity``)."""
    if s is None:
        return
    with doc.section("sensitivity", "Calibration size"):
        doc.p(s.line() + ".")
        if s.mean_curve:
            doc.fig("sensitivity", sensitivity_figure(s),
                    "Cosine of the n-sample calibration gradient with a larger reference")  # fmt: skip


def _group_row(g: PlanGroup) -> list:
    fams: dict[str, int] = {}
    for n in g.datasets:
        fams[family(n)] = fams.get(family(n), 0) + 1
    top = ", ".join(f"{f} ({c})" for f, c in sorted(fams.items(), key=lambda x: -x[1])[:3])
    return [
        f"group {g.id}",
        len(g.datasets),
        f"{g.samples:,}",
        f"{g.tokens:,}",
        f"{g.weight:.3f}",
        top + (" …" if len(fams) > 3 else ""),
    ]


def plan_section(doc: Document, plan: Plan) -> None:
    with doc.section("plan", "The plan"):
        evs = ", ".join(f"{x:.1%}" for x in plan.explained_variance)
        method = plan.method
        how = (
            "recursive sample-balanced median splits"
            if method == "median"
            else f"the {method} splitter"
        )
        doc.p(
            f"Representative gradients at θ0 → cosine matrix → PCA to r = "
            f"{plan.rank} conflict axes (explained variance {evs}) → {how} → "
            f"K = {plan.K} groups. Merge weights w_k = N_k / Σ N_j (train tokens)."
        )
        for w in plan.warnings:
            doc.p(f"Plan warning: {w}")
        head = ["group", "datasets", "samples", "tokens", "w_k", "largest families"]
        doc.table(head, [_group_row(g) for g in plan.groups])
        figs = plan_figures(plan.to_json())
        doc.raw_html('<div class="grid">')
        doc.fig(
            "conflict", figs["conflict"], "Cosine matrix of dataset gradients, ordered by group"
        )
        doc.fig("pca", figs["pca"], "Datasets on the first conflict axes, coloured by group")
        doc.raw_html("</div>")


def _run_row(name: str, m: BranchManifest) -> list:
    return [
        name,
        len(m.datasets),
        f"{m.tokens:,}",
        m.steps,
        f"{m.final_loss:.4f}" if m.final_loss is not None else "–",
        f"{m.seconds:.0f}" if m.seconds is not None else "–",
    ]


def branches_section(doc: Document, rd: ReportData) -> None:
    with doc.section("branches", "Branches"):
        rows = [_run_row(m.label or f"branch {i}", m) for i, m in enumerate(rd.branches)]
        if rd.joint:
            rows.append(_run_row("joint (baseline)", rd.joint))
        doc.table(["run", "datasets", "tokens", "steps", "final loss", "seconds"], rows)
        joint = rd.joint.to_json() if rd.joint else None
        curves = loss_curve_figure([m.to_json() for m in rd.branches], joint)
        doc.fig("losses", curves, "Training loss of each branch")


def merge_section(doc: Document, rd: ReportData) -> None:
    with doc.section("merge", "The merge"):
        if rd.merge:
            m = rd.merge
            w = m.weights
            doc.p(
                f"θ̄ = Σ_k w_k θ_k over {len(w)} branches ({m.num_tensors} tensors, "
                f"{m.total_bytes / 2**20:.1f} MiB, dtype {m.dtype or 'θ0'}), "
                "weights " + ", ".join(f"{x:.3f}" for x in w) + "."
            )
            if m.method != "linear":
                doc.p(f"Method {m.method}: {m.formula}; parameters {m.params}.")
            fit = m.metadata.get("learned")
            if fit:
                v = fit["validation_loss"]
                doc.p(f"Learned coefficients: validation loss {v['start']:.4f} at the start, "
                      f"{v['fitted']:.4f} fitted (best step {fit['best_step']}).")  # fmt: skip
                doc.fig("coefficients", coefficients_figure(fit["groups"], w),
                        "Learned merge coefficients per layer group")  # fmt: skip
        dist = rd.diagnostics.distances if rd.diagnostics else None
        if dist:
            rows = [[f"branch {i}", f"{d:.4g}"] for i, d in enumerate(dist["branches"])]
            rows.append(["θ̄ (merged)", f"{dist['merged']:.4g}"])
            if dist.get("joint") is not None:
                rows.append(["joint", f"{dist['joint']:.4g}"])
            doc.table(["model", "‖θ − θ0‖"], rows)


def _verdict_list(doc: Document, diag: Diagnostics) -> None:
    items, md_items = [], []
    for v in diag.verdicts:
        cls = {True: "ok", False: "bad"}.get(v["holds"], "")
        tag = {True: "holds", False: "fails", None: "n/a"}[v["holds"]]
        items.append(
            f'<li class="{cls}" data-premise="{html.escape(v.get("key", ""))}">'
            f'<span class="badge">{tag}</span><b>{html.escape(v["premise"])}</b> — '
            f"{html.escape(v['why'])}</li>"
        )
        md_items.append(f"- **{v['premise']}: {tag}.** {v['why']}")
    doc.raw_html('<ul class="verdicts">' + "".join(items) + "</ul>")
    doc.md.append("\n".join(md_items) + "\n")


def _diagnostics_body(doc: Document, diag: Diagnostics) -> None:
    ex = diag.examples
    doc.p(
        f"All on the same {ex.get('heldout', '?')} held-out examples "
        f"({ex.get('heldout_tokens', '?')} answer tokens, spread over the datasets); "
        "loss = mean NLL per answer token.",
        "muted",
    )
    _verdict_list(doc, diag)
    dfig = diagnostic_figures(diag)
    doc.fig(
        "barriers",
        dfig.get("barriers"),
        "Loss along the straight line between each pair of branches, θ0 → θ̄ and θ0 → joint",
    )
    doc.raw_html('<div class="grid">')
    doc.fig("perturbation", dfig.get("perturbation"), "Loss under random perturbations")
    doc.fig("generalization", dfig.get("generalization"), "Train vs held-out loss")
    doc.raw_html("</div>")
    doc.fig("gain", dfig.get("gain"), "Measured merging gain vs ½ Σ w_k (δ_k−δ̄)ᵀH(δ_k−δ̄)")
    doc.fig("distances", dfig.get("distances"), "Distance of each model to θ0")
    doc.p(
        f"{diag.evaluations} loss evaluations and {diag.hvps} Hessian-vector products over "
        f"{diag.parameters:,} parameters in {sum(diag.timings.values()):.0f} s.",
        "muted",
    )


def diagnostics_section(doc: Document, diag: Diagnostics | None) -> None:
    with doc.section("diagnostics", "Is θ0 merge-ready? Diagnostics"):
        if diag:
            _diagnostics_body(doc, diag)
        else:
            doc.p("No diagnostics yet: run `merit diagnose`.")


def _results_table(doc: Document, ev: dict[str, dict], metric: Metric) -> None:
    order = model_order(ev)
    ft = family_table({m: ev[m] for m in order}, metric)
    conf = next((r["summary"].get("confidence") for r in ev.values()), None)
    doc.h(3, metric.title)
    head = [
        "model",
        *[f"{c} ({s})" for c, s in zip(ft.columns, ft.sizes)],
        "average" + (f" [{conf:.0%} CI]" if conf else ""),
    ]
    rows = []
    for m in order:
        avg = cell(ft.average[m], metric)
        ci = ft.interval.get(m)
        if ci:
            avg += f" [{cell(ci[0], metric)}, {cell(ci[1], metric)}]"
        rows.append([model_label(m, ev[m]), *[cell(v, metric) for v in ft.rows[m]], avg])
    doc.table(head, rows, cls="results", strong=best_cells(ft, order, metric))


def _paired(r: dict | None, m: Metric) -> str:
    if not r:
        return "–"
    lo, hi = r["ci"]
    return f"{m.fmt.delta(r['difference'])} [{m.fmt.delta(lo)}, {m.fmt.delta(hi)}]"


def _comparison_head(m: Metric, lead: bool) -> list[str]:
    """A metric's columns: its difference (unit named in the header), P(A better) and, for the
    headline metric, the datasets each model wins; the headline's read plainly ("better"), the
    others name their direction ("P(A lower NLL)")."""
    unit = f" ({m.fmt.delta_unit})" if m.fmt.delta_unit else ""
    if lead:
        return [f"Δ {m.noun}{unit} [CI]", "P(A better)", "datasets A/=/B"]
    return [f"Δ {m.noun}{unit} [CI]", f"P(A {m.better})"]


def _comparison_cells(p: dict | None, m: Metric, lead: bool) -> list[str]:
    cells = [_paired(p, m), f"{p['p_a_better']:.2f}" if p else "–"]
    if lead:
        cells.append(f"{p['wins']}/{p['ties']}/{p['losses']}" if p else "–")
    return cells


def _comparisons(doc: Document, rd: ReportData) -> None:
    doc.h(3, "Paired comparisons")
    shown = page_metrics(rd.comparisons.values())
    lead = headline(shown)
    rows = []
    for name, r in rd.comparisons.items():
        cells = [comparison_title(name, r, rd.evaluation)]
        for m in shown:
            cells += _comparison_cells(r.get(m.name), m, m is lead)
        rows.append(cells)
    head = [c for m in shown for c in _comparison_head(m, m is lead)]
    doc.table(["A vs B", *head], rows)
    doc.p("Both models resampled with the same examples in every bootstrap draw (paired).", "muted")


def results_section(doc: Document, rd: ReportData) -> None:
    with doc.section("results", "Results"):
        if rd.evaluation:
            for m in page_metrics(r["summary"] for r in rd.evaluation.values()):
                _results_table(doc, rd.evaluation, m)
            doc.p(
                "Columns: dataset families (number of datasets); every dataset counts once. "
                "Multiple choice is scored by log-likelihood normalised by answer length; "
                "generative answers by exact match after BIG-bench's post-processing. "
                "Intervals: stratified bootstrap over held-out examples.",
                "muted",
            )
        if rd.comparisons:
            _comparisons(doc, rd)


def comparison_section(doc: Document, rd: ReportData) -> None:
    """`merit compare`'s table (paper §5): every row against joint training, one token budget."""
    res = rd.comparison
    if not res:
        return
    with doc.section("comparison", "Comparison"):
        head, body = table_cells(res["rows"])
        doc.table(head, body)
        doc.p(
            "Each row trained, merged and scored by the ordinary stages in its own run directory "
            "(compare/runs/); Δ is the row minus joint training (1 epoch), paired bootstrap "
            "intervals over held-out examples; α and the learning rate were chosen on the "
            "validation split carved from the training examples.",
            "muted",
        )
        d = res.get("diagnostics") or {}
        if d:
            doc.p(
                f"MERIT-2D vs joint: ‖θ_joint − θ0‖/‖θ̄ − θ0‖ = {d['distance_ratio']:.2f}, train "
                f"loss {d['merged_train_loss']:.3f} vs {d['joint_train_loss']:.3f}, held-out "
                f"NLL gap {d['heldout_nll_gap']:+.3f}."
            )
        doc.fig("compare_gain", rd.comparison_figure, "NLL gain of each row over joint training")
        if res.get("claims"):
            doc.h(3, "The paper's claims, as measured here")
            doc.table(
                ["claim (paper §5)", "verdict", "numbers"],
                [[c["claim"], c["verdict"], c["detail"]] for c in res["claims"]],
            )


def build_report(rd: ReportData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``index.html`` (self-contained), ``report.md`` and ``figures/*.png`` to ``out_dir``."""
    doc = Document()
    summary_section(doc, rd)
    mixture_section(doc, rd)
    plan_section(doc, rd.plan)
    sensitivity_section(doc, rd.sensitivity)
    branches_section(doc, rd)
    merge_section(doc, rd)
    diagnostics_section(doc, rd.diagnostics)
    results_section(doc, rd)
    comparison_section(doc, rd)
    if rd.timings:
        with doc.section("timings", "Wall time per stage"):
            rows = [[s, f"{v:.0f}"] for s, v in rd.timings.items() if isinstance(v, int | float)]
            doc.table(["stage", "seconds"], rows)
            o = overhead(rd.timings, [m.seconds for m in rd.branches])
            if o is not None:
                doc.p(o.line() + ".")
    absent = {"comparison": not rd.comparison, "sensitivity": rd.sensitivity is None}
    nav = [n for n in NAV if not absent.get(n[0])]
    return write_documents(doc, rd.title, nav, Path(out_dir))
