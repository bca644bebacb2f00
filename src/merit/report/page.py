"""The run report: one self-contained HTML page (figures embedded) and its Markdown twin.

Sections follow the pipeline: the mixture, the plan (conflict matrix ordered by group, the PCA
map), each branch's loss curve, the merge, the diagnostics of the paper's premises (§4), and the
results table laid out like the paper's (one row per model, one column per dataset family, the
dataset average with its bootstrap interval), then paired comparisons.

Figures are matplotlib PNGs; the HTML embeds them as base64 data URIs, so the page opens
offline and can be mailed as one file. A small script in the page records, on load, each image's
decoded size in ``data-decoded`` (and ``data-images="ok/total"`` on ``<body>``): a headless
browser's DOM dump then proves every figure decoded.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GROUP_COLORS = [
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
]
MERGED_COLOR, JOINT_COLOR, BASE_COLOR = "#222222", "#C44E52", "#8C8C8C"
_NUMERIC = re.compile(r"^[\s\d.,:+\-−–%×/\[\]eptn]*\d[\s\d.,:+\-−–%×/\[\]eptn]*$|^[–-]$")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "font.size": 9,
            "axes.titlesize": 10,
            "legend.fontsize": 8,
            "legend.frameon": False,
        }
    )
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return buf.getvalue()


def _color(k: int) -> str:
    return GROUP_COLORS[k % len(GROUP_COLORS)]


def family(name: str) -> str:
    """A dataset's family: BIG-bench ``FAMILY__SUBTASK`` files share FAMILY; others stand alone."""
    return name.split("__", 1)[0]


# -- diagnostics figures ------------------------------------------------------------------------
def diagnostic_figures(diag: dict) -> dict[str, bytes]:
    """PNG bytes of each diagnostics figure: barriers, distances, generalization, perturbation,
    gain."""
    plt = _plt()
    out: dict[str, bytes] = {}

    bars = diag.get("barriers", [])
    if bars:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
        for i, b in enumerate(bars):
            if b["kind"] == "branches":
                kw = {"color": _color(i), "lw": 1.4, "alpha": 0.85}
            elif b["kind"] == "base-merged":
                kw = {"color": MERGED_COLOR, "lw": 2.2}
            else:
                kw = {"color": JOINT_COLOR, "lw": 2.0, "ls": "--"}
            label = f"{b['label']} (barrier {b['barrier']:+.3f})"
            ax1.plot(b["alpha"], b["loss"], marker="o", ms=3, label=label, **kw)
            ax2.plot(b["alpha"], b["excess"], marker="o", ms=3, **kw)
        ax1.set(xlabel="α (0 = first endpoint, 1 = second)", ylabel="held-out loss (nats/token)")
        ax1.set_title("Loss along straight lines")
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set(xlabel="α", ylabel="loss − chord between endpoints")
        ax2.set_title("Barrier curves (> 0: a ridge between the endpoints)")
        ax1.legend(loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2)
        out["barriers"] = _png(fig)

    dist = diag.get("distances")
    if dist:
        labels = [f"branch {i}" for i in range(len(dist["branches"]))] + ["θ̄ (merged)"]
        values = [*dist["branches"], dist["merged"]]
        colors = [_color(i) for i in range(len(dist["branches"]))] + [MERGED_COLOR]
        if dist.get("joint") is not None:
            labels.append("joint")
            values.append(dist["joint"])
            colors.append(JOINT_COLOR)
        fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(labels) + 1.0))
        y = np.arange(len(labels))[::-1]
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.3g}", va="center")
        title = "Distance to θ0: ‖θ − θ0‖"
        if dist.get("ratio_joint_merged"):
            title += f" — joint is {dist['ratio_joint_merged']:.2f}× farther than θ̄"
        ax.set_title(title)
        ax.set_xlabel("Euclidean distance over all parameters")
        ax.set_xlim(0, max(values) * 1.18 if values else 1)
        out["distances"] = _png(fig)

    gen = diag.get("generalization")
    if gen:
        names = [n for n in ("base", "merged", "joint") if n in gen]
        pretty = {"base": "θ0", "merged": "θ̄ (merged)", "joint": "joint"}
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        x = np.arange(len(names))
        tr = [gen[n]["train"] for n in names]
        he = [gen[n]["heldout"] for n in names]
        ax.bar(x - 0.18, tr, 0.36, label="train", color="#9DB4D6")
        ax.bar(x + 0.18, he, 0.36, label="held-out", color="#4C72B0")
        for xi, a, b in zip(x, tr, he):
            ax.text(xi - 0.18, a, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
            ax.text(xi + 0.18, b, f"{b:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [pretty[n] for n in names])
        lo = min(tr + he)
        ax.set_ylim(lo - 0.15 * abs(lo), max(tr + he) * 1.06)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Train vs held-out loss")
        ax.legend()
        out["generalization"] = _png(fig)

    pert = diag.get("perturbation")
    if pert and pert.get("merged"):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        scales = pert["scales"]
        for key, color, label in (
            ("merged", MERGED_COLOR, "θ̄ (merged)"),
            ("joint", JOINT_COLOR, "joint"),
        ):
            c = pert.get(key)
            if not c:
                continue
            rise = np.array(c["mean"]) - c["loss"]
            std = np.array(c["std"])
            ax.errorbar(
                scales, rise, yerr=std, color=color, marker="o", ms=4, capsize=3, label=label
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set(
            xlabel="perturbation norm ‖σε‖ / ‖θ̄ − θ0‖",
            ylabel="loss rise over the unperturbed model",
        )
        ax.set_title("Flatness: isotropic Gaussian perturbations")
        ax.legend()
        out["perturbation"] = _png(fig)

    g = diag.get("gain")
    if g and len(g.get("weights", [])) > 1:
        split = g.get("eigen_split") or []
        ncols = 2 if split else 1
        fig, axes = plt.subplots(1, ncols, figsize=(4.8 * ncols, 3.4), squeeze=False)
        ax = axes[0, 0]
        ax.bar([0], [g["measured"]], 0.6, color="#2E4057", label="measured")
        bottom = 0.0
        for k, p in enumerate(g["predicted_per_branch"]):
            ax.bar([1], [p], 0.6, bottom=bottom, color=_color(k), alpha=0.9, label=f"branch {k}")
            bottom += p
        ax.set_xticks([0, 1], ["measured\nΣ w_k L(θ_k) − L(θ̄)", "predicted\n½ Σ w_k dᵀ H d"])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("gain (nats/token)")
        ratio = g.get("ratio")
        ax.set_title(
            "Merging gain vs quadratic theory" + (f" (ratio {ratio:.2f})" if ratio else "")
        )
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
        if split:
            ax = axes[0, 1]
            labels = [f"u{i + 1}\nλ={lam:.3g}" for i, lam in enumerate(g["eigenvalues"])]
            labels.append("rest")
            vals = [*split, g["rest"]]
            colors = ["#4C72B0"] * len(split) + ["#BBBBBB"]
            ax.bar(range(len(vals)), vals, color=colors)
            ax.set_xticks(range(len(vals)), labels, fontsize=7)
            ax.axhline(0, color="black", lw=0.8)
            share = sum(split) / g["predicted"] if g["predicted"] else float("nan")
            ax.set_title(f"Prediction by Hessian direction (top {len(split)}: {share:.0%})")
        out["gain"] = _png(fig)
    return out


# -- run figures --------------------------------------------------------------------------------
def plan_figures(plan: dict) -> dict[str, bytes]:
    """The conflict (cosine) matrix ordered by group, and the PCA conflict map."""
    plt = _plt()
    out: dict[str, bytes] = {}
    ds = plan["datasets"]
    groups = np.array([d["group"] for d in ds])
    z = np.array([d["z"] for d in ds]) if ds and ds[0].get("z") else np.zeros((len(ds), 0))
    first = z[:, 0] if z.shape[1] else np.zeros(len(ds))
    order = np.lexsort((first, groups))
    c = np.asarray(plan["cosine"])[np.ix_(order, order)]
    n = len(ds)
    fig, ax = plt.subplots(figsize=(5.8, 5.0))
    lim = float(np.quantile(np.abs(c[~np.eye(n, dtype=bool)]), 0.98)) if n > 1 else 1.0
    im = ax.imshow(c, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.grid(False)
    cuts = np.flatnonzero(np.diff(groups[order])) + 0.5
    for cut in cuts:
        ax.axhline(cut, color="black", lw=0.8)
        ax.axvline(cut, color="black", lw=0.8)
    starts = [0, *list((cuts + 0.5).astype(int)), n]
    mids = [(starts[k] + starts[k + 1] - 1) / 2 for k in range(len(starts) - 1)]
    ax.set_xticks(mids, [f"group {groups[order][starts[k]]}" for k in range(len(mids))])
    ax.tick_params(axis="x", length=0)
    if n <= 40:
        ax.set_yticks(range(n), [ds[i]["name"] for i in order], fontsize=6)
    else:
        ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine of representative gradients")
    ax.set_title("Conflict matrix, datasets ordered by group")
    out["conflict"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    ev = plan.get("explained_variance", [])
    if z.shape[1] >= 2:
        x, y = z[:, 0], z[:, 1]
        ax.set_ylabel(f"PC2 ({ev[1]:.1%} of variance)" if len(ev) > 1 else "PC2")
    else:
        x = first
        y = np.asarray([d.get("calibration_loss", 0.0) for d in ds])
        ax.set_ylabel("calibration loss at θ0")
    for k in sorted(set(groups.tolist())):
        m = groups == k
        ax.scatter(x[m], y[m], s=14, color=_color(k), label=f"group {k} ({m.sum()})", alpha=0.85)
    ax.set_xlabel(f"PC1 ({ev[0]:.1%} of variance)" if ev else "PC1")
    ax.set_title("PCA conflict map (each point a dataset)")
    ax.legend(loc="best", markerscale=1.5)
    out["pca"] = _png(fig)
    return out


def loss_curve_figure(branches: Sequence[dict], joint: dict | None) -> bytes | None:
    """Each branch's (and the joint baseline's) training loss against its optimizer step."""
    if not any(m.get("losses") for m in branches) and not (joint and joint.get("losses")):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for k, m in enumerate(branches):
        if m.get("losses"):
            s, v = zip(*m["losses"])
            ax.plot(s, v, color=_color(k), lw=1.4, label=f"branch {k} ({len(m['datasets'])} ds)")
    if joint and joint.get("losses"):
        s, v = zip(*joint["losses"])
        ax.plot(s, v, color=JOINT_COLOR, lw=1.6, ls="--", label="joint (all datasets)")
    ax.set(xlabel="optimizer step", ylabel="train loss (answer tokens)")
    ax.set_title("Branch training curves (each from θ0, no communication)")
    ax.legend()
    return _png(fig)


def mixture_figure(data: dict, plan: dict | None, top: int = 24) -> bytes | None:
    """Train tokens per dataset family, coloured by the group its datasets went to."""
    rows = data.get("datasets", [])
    if not rows:
        return None
    plt = _plt()
    group = {d["name"]: d["group"] for d in plan["datasets"]} if plan else {}
    fams: dict[str, dict[int, int]] = {}
    for r in rows:
        f = fams.setdefault(family(r["name"]), {})
        g = group.get(r["name"], 0)
        f[g] = f.get(g, 0) + r["train_tokens"]
    order = sorted(fams, key=lambda f: -sum(fams[f].values()))
    shown = order[:top]
    rest = order[top:]
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    ks = sorted({g for f in fams.values() for g in f})
    bottom = np.zeros(len(shown) + (1 if rest else 0))
    for g in ks:
        vals = [fams[f].get(g, 0) for f in shown]
        if rest:
            vals.append(sum(fams[f].get(g, 0) for f in rest))
        ax.bar(range(len(vals)), vals, bottom=bottom, color=_color(g), label=f"group {g}")
        bottom += np.asarray(vals, dtype=float)
    labels = [f"{f} ({len([r for r in rows if family(r['name']) == f])})" for f in shown]
    if rest:
        labels.append(f"{len(rest)} other families")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("train tokens")
    ax.set_title("The mixture: train tokens per dataset family (datasets), by plan group")
    ax.legend(ncol=min(4, len(ks)))
    return _png(fig)


# -- tables -------------------------------------------------------------------------------------
@dataclass
class FamilyTable:
    columns: list[str]
    sizes: list[int]
    rows: dict[str, list[float | None]]
    average: dict[str, float | None]
    interval: dict[str, list[float] | None]


def family_table(
    evaluation: dict[str, dict], metric: str = "accuracy", max_columns: int = 16
) -> FamilyTable:
    """Models × dataset families (each dataset counts once in its family and in the average).

    With more than ``max_columns`` families, the largest keep a column and the rest share one.
    """
    first = next(iter(evaluation.values()))["datasets"]
    fams: dict[str, list[str]] = {}
    for name in first:
        fams.setdefault(family(name), []).append(name)
    order = sorted(fams, key=lambda f: (-len(fams[f]), f))
    if len(order) > max_columns:
        keep, rest = order[: max_columns - 1], order[max_columns - 1 :]
        columns = {f: fams[f] for f in keep}
        columns[f"other ({len(rest)} families)"] = [n for f in rest for n in fams[f]]
    else:
        columns = {f: fams[f] for f in order}
    rows: dict[str, list[float | None]] = {}
    avg: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    for label, rec in evaluation.items():
        per = rec["datasets"]
        vals = []
        for names in columns.values():
            xs = [per[n][metric] for n in names if per.get(n, {}).get(metric) is not None]
            vals.append(float(np.mean(xs)) if xs else None)
        rows[label] = vals
        avg[label] = rec["summary"].get(metric)
        ci[label] = rec["summary"].get(f"{metric}_ci")
    return FamilyTable(list(columns), [len(v) for v in columns.values()], rows, avg, ci)


def _cell(v: float | None, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.3f}"


# -- the report ---------------------------------------------------------------------------------
@dataclass
class ReportData:
    """Everything the report shows, read from a run directory by ``merit.pipeline.report``."""

    title: str
    run_dir: str
    config: dict
    data: dict | None
    plan: dict
    branches: list[dict]
    joint: dict | None = None
    merge: dict | None = None
    evaluation: dict[str, dict] = field(default_factory=dict)
    comparisons: dict[str, dict] = field(default_factory=dict)
    diagnostics: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Doc:
    """Builds the HTML and the Markdown side by side."""

    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{anchor}"' if anchor else ""
        self.html.append(f"<h{level}{a}>{html.escape(text)}</h{level}>")
        self.md.append("#" * level + " " + text + "\n")

    def p(self, text: str, cls: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def fig(self, name: str, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        self.figures[name] = png
        b64 = base64.b64encode(png).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(caption)}" data-figure="{name}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>"
        )
        self.md.append(f"![{caption}](figures/{name}.png)\n\n*{caption}*\n")

    def table(
        self,
        head: Sequence[str],
        rows: Sequence[Sequence[object]],
        cls: str = "",
        strong: set[tuple[int, int]] | None = None,
    ) -> None:
        """A table in both documents; ``strong`` cells (row, column) are emphasised."""
        strong = strong or set()
        # A column of numbers is right-aligned (header included), anything else left.
        num = [
            i > 0 and all(_NUMERIC.match(str(r[i])) for r in rows) and bool(rows)
            for i in range(len(head))
        ]
        cls_ = [' class="num"' if n else "" for n in num]
        th = "".join(f"<th{cls_[i]}>{html.escape(h)}</th>" for i, h in enumerate(head))
        body = []
        for j, r in enumerate(rows):
            tds = "".join(
                f"<td{cls_[i]}>"
                + (f"<b>{html.escape(str(x))}</b>" if (j, i) in strong else html.escape(str(x)))
                + "</td>"
                for i, x in enumerate(r)
            )
            body.append(f"<tr>{tds}</tr>")
        self.html.append(
            f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
        esc = [str(h).replace("|", "\\|") for h in head]
        self.md.append("| " + " | ".join(esc) + " |")
        self.md.append("|" + "|".join("---:" if n else "---" for n in num) + "|")
        for j, r in enumerate(rows):
            cells = [str(x).replace("|", "\\|") for x in r]
            cells = [f"**{c}**" if (j, i) in strong else c for i, c in enumerate(cells)]
            self.md.append("| " + " | ".join(cells) + " |")
        self.md.append("")

    def raw_html(self, text: str) -> None:
        self.html.append(text)


CSS = """
:root { --fg:#1d232b; --muted:#5b6673; --line:#e3e7ec; --bg:#f6f8fa; --ok:#1f7a3f; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", "Liberation Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1d2733; color:#fff; padding:22px 0 18px; }
header .wrap h1 { margin:0 0 4px; font-size:22px; }
header .wrap p { margin:0; color:#c7d0da; }
.wrap { max-width:1120px; margin:0 auto; padding:0 24px; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; }
nav a { display:inline-block; padding:9px 12px; color:var(--muted); text-decoration:none; font-size:13px; }
nav a:hover { color:var(--fg); }
section { background:#fff; border:1px solid var(--line); border-radius:8px; margin:18px 0; padding:6px 22px 16px; }
h2 { font-size:18px; margin:14px 0 8px; }
h3 { font-size:15px; margin:14px 0 6px; }
p { margin:6px 0 10px; }
.muted { color:var(--muted); font-size:13px; }
figure { margin:10px 0 16px; text-align:center; }
figure img { max-width:100%; height:auto; }
figcaption { color:var(--muted); font-size:12px; margin-top:2px; }
.grid { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap:8px 20px; align-items:start; }
.scroll { overflow-x:auto; margin:6px 0 14px; }
table { border-collapse:collapse; font-size:12.5px; min-width:50%; }
th, td { padding:4px 9px; border-bottom:1px solid var(--line); white-space:nowrap; text-align:left; }
th { background:#f0f3f6; font-weight:600; position:sticky; top:0; }
th.num, td.num { text-align:right; font-variant-numeric: tabular-nums; }
table.results td:first-child, table.results th:first-child { position:sticky; left:0; background:#fff; z-index:1; }
table.results td:last-child, table.results th:last-child { position:sticky; right:0; background:#f4f7fb;
  border-left:1px solid var(--line); }
table.results th { background:#f0f3f6; }
tbody tr:nth-child(even) { background:#fafbfc; }
.verdicts { list-style:none; padding:0; margin:8px 0; }
.verdicts li { border-left:4px solid #999; background:#fafbfc; padding:8px 12px; margin:8px 0; border-radius:0 6px 6px 0; }
.verdicts li.ok { border-color:var(--ok); } .verdicts li.bad { border-color:var(--bad); }
.badge { display:inline-block; font-size:11px; font-weight:700; padding:1px 7px; border-radius:10px; margin-right:8px; color:#fff; background:#888; }
.ok .badge { background:var(--ok); } .bad .badge { background:var(--bad); }
.overall { font-size:16px; font-weight:600; margin:10px 0; }
.kpis { display:flex; flex-wrap:wrap; gap:12px; margin:10px 0; }
.kpi { border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:150px; }
.kpi b { display:block; font-size:18px; } .kpi span { color:var(--muted); font-size:12px; }
"""

# Records each image's decoded size on load (see the module docstring).
DECODE_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) {
    im.setAttribute('data-decoded', im.naturalWidth + 'x' + im.naturalHeight);
    if (im.complete && im.naturalWidth > 0 && im.naturalHeight > 0) { ok++; }
  });
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def _order_models(evaluation: dict[str, dict]) -> list[str]:
    def key(label: str) -> tuple[int, str]:
        if label.startswith("θ0"):
            return (0, label)
        if label == "joint":
            return (1, label)
        if label.startswith("MERIT"):
            return (2, label)
        return (3, label)

    return sorted(evaluation, key=key)


def build_report(rd: ReportData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``index.html`` (self-contained), ``report.md`` and ``figures/*.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    doc = _Doc()
    plan = rd.plan
    k = plan["K"]
    diag = rd.diagnostics or {}

    # -- summary
    doc.raw_html('<section id="summary">')
    doc.h(2, "Summary", "summary-h")
    n_ds = len(plan["datasets"])
    kpis = [(str(n_ds), "datasets"), (f"K = {k}", f"branches from r = {plan['rank']} axes")]
    ev = rd.evaluation
    merged_label = next((m for m in ev if m.startswith("MERIT")), None)
    if merged_label and "joint" in ev:
        for metric, name in (("accuracy", "accuracy"), ("nll", "held-out NLL")):
            a, b = ev[merged_label]["summary"].get(metric), ev["joint"]["summary"].get(metric)
            if a is not None and b is not None:
                txt = f"{100 * (a - b):+.2f} pt" if metric == "accuracy" else f"{a - b:+.4f}"
                better = "higher" if metric == "accuracy" else "lower"
                kpis.append((txt, f"MERIT − joint, {name} ({better} is better)"))
    if diag.get("distances", {}).get("ratio_joint_merged"):
        kpis.append((f"{diag['distances']['ratio_joint_merged']:.2f}×", "joint's distance / θ̄'s"))
    doc.raw_html(
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi"><b>{html.escape(v)}</b><span>{html.escape(t)}</span></div>'
            for v, t in kpis
        )
        + "</div>"
    )
    doc.md.append("\n".join(f"- **{v}** {t}" for v, t in kpis) + "\n")
    if diag.get("overall"):
        doc.raw_html(f'<p class="overall">{html.escape(diag["overall"])}</p>')
        doc.md.append(f"**{diag['overall']}**\n")
    model_path = rd.config.get("model", {}).get("path", "?")
    doc.p(
        f"Run directory {rd.run_dir}; θ0 = {model_path}. Every number on this page is read from "
        "the run's artifacts; held-out data were never used to choose anything.",
        "muted",
    )
    doc.raw_html("</section>")

    # -- mixture
    doc.raw_html('<section id="mixture">')
    doc.h(2, "The mixture", "mixture-h")
    if rd.data:
        rows = rd.data["datasets"]
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
        doc.fig("mixture", mixture_figure(rd.data, plan), "Train tokens per dataset family")
    doc.raw_html("</section>")

    # -- plan
    doc.raw_html('<section id="plan">')
    doc.h(2, "The plan", "plan-h")
    evs = ", ".join(f"{x:.1%}" for x in plan.get("explained_variance", []))
    method = plan.get("method", "median")
    how = (
        "recursive sample-balanced median splits"
        if method == "median"
        else f"the {method} splitter"
    )
    doc.p(
        f"Representative gradients at θ0 → cosine matrix → PCA to r = {plan.get('rank', '?')} "
        f"conflict axes (explained variance {evs}) → {how} → K = {k} groups. Merge weights "
        "w_k = N_k / Σ N_j (train tokens)."
    )
    for w in plan.get("warnings") or []:
        doc.p(f"Plan warning: {w}")
    grows = []
    for g in plan["groups"]:
        fams: dict[str, int] = {}
        for n in g["datasets"]:
            fams[family(n)] = fams.get(family(n), 0) + 1
        top = ", ".join(f"{f} ({c})" for f, c in sorted(fams.items(), key=lambda x: -x[1])[:3])
        grows.append(
            [
                f"group {g['id']}",
                len(g["datasets"]),
                f"{g['samples']:,}",
                f"{g['tokens']:,}",
                f"{g['weight']:.3f}",
                top + (" …" if len(fams) > 3 else ""),
            ]
        )
    doc.table(["group", "datasets", "samples", "tokens", "w_k", "largest families"], grows)
    figs = plan_figures(plan)
    doc.raw_html('<div class="grid">')
    doc.fig("conflict", figs["conflict"], "Cosine matrix of dataset gradients, ordered by group")
    doc.fig("pca", figs["pca"], "Datasets on the first conflict axes, coloured by group")
    doc.raw_html("</div>")
    doc.raw_html("</section>")

    # -- branches
    doc.raw_html('<section id="branches">')
    doc.h(2, "Branches", "branches-h")
    brows = []
    for i, m in enumerate(rd.branches):
        brows.append(
            [
                m.get("label", f"branch {i}"),
                len(m.get("datasets", [])),
                f"{m.get('tokens', 0):,}",
                m.get("steps", "?"),
                f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "–",
                f"{m['seconds']:.0f}" if m.get("seconds") is not None else "–",
            ]
        )
    if rd.joint:
        m = rd.joint
        brows.append(
            [
                "joint (baseline)",
                len(m.get("datasets", [])),
                f"{m.get('tokens', 0):,}",
                m.get("steps", "?"),
                f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "–",
                f"{m['seconds']:.0f}" if m.get("seconds") is not None else "–",
            ]
        )
    doc.table(["run", "datasets", "tokens", "steps", "final loss", "seconds"], brows)
    doc.fig("losses", loss_curve_figure(rd.branches, rd.joint), "Training loss of each branch")
    doc.raw_html("</section>")

    # -- merge
    doc.raw_html('<section id="merge">')
    doc.h(2, "The merge", "merge-h")
    if rd.merge:
        w = rd.merge.get("weights", [])
        doc.p(
            f"θ̄ = Σ_k w_k θ_k over {len(w)} branches ({rd.merge.get('num_tensors', '?')} tensors, "
            f"{rd.merge.get('total_bytes', 0) / 2**20:.1f} MiB, dtype "
            f"{rd.merge.get('dtype') or 'θ0'}), weights " + ", ".join(f"{x:.3f}" for x in w) + "."
        )
    dist = diag.get("distances")
    if dist:
        rows = [[f"branch {i}", f"{d:.4g}"] for i, d in enumerate(dist["branches"])]
        rows.append(["θ̄ (merged)", f"{dist['merged']:.4g}"])
        if dist.get("joint") is not None:
            rows.append(["joint", f"{dist['joint']:.4g}"])
        doc.table(["model", "‖θ − θ0‖"], rows)
    doc.raw_html("</section>")

    # -- diagnostics
    doc.raw_html('<section id="diagnostics">')
    doc.h(2, "Is θ0 merge-ready? Diagnostics", "diagnostics-h")
    if diag:
        doc.p(
            f"All on the same {diag.get('examples', {}).get('heldout', '?')} held-out examples "
            f"({diag.get('examples', {}).get('heldout_tokens', '?')} answer tokens, spread over the "
            "datasets); loss = mean NLL per answer token.",
            "muted",
        )
        items = []
        md_items = []
        for v in diag.get("verdicts", []):
            cls = {True: "ok", False: "bad"}.get(v["holds"], "")
            tag = {True: "holds", False: "fails", None: "n/a"}[v["holds"]]
            items.append(
                f'<li class="{cls}"><span class="badge">{tag}</span><b>'
                f"{html.escape(v['premise'])}</b> — {html.escape(v['why'])}</li>"
            )
            md_items.append(f"- **{v['premise']}: {tag}.** {v['why']}")
        doc.raw_html('<ul class="verdicts">' + "".join(items) + "</ul>")
        doc.md.append("\n".join(md_items) + "\n")
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
        t = diag.get("timings", {})
        doc.p(
            f"{diag.get('evaluations', '?')} loss evaluations and {diag.get('hvps', '?')} "
            f"Hessian-vector products over {diag.get('parameters', 0):,} parameters "
            f"in {sum(t.values()):.0f} s.",
            "muted",
        )
    else:
        doc.p("No diagnostics yet: run `merit diagnose`.")
    doc.raw_html("</section>")

    # -- results
    doc.raw_html('<section id="results">')
    doc.h(2, "Results", "results-h")
    if ev:
        order = _order_models(ev)
        ordered = {m: ev[m] for m in order}
        conf = next((r["summary"].get("confidence") for r in ev.values()), None)
        for metric, title, unit in (
            ("accuracy", "Accuracy (%) per dataset family", "accuracy"),
            ("nll", "Held-out NLL per answer token, per dataset family (lower is better)", "nll"),
        ):
            ft = family_table(ordered, metric)
            doc.h(3, title)
            head = [
                "model",
                *[f"{c} ({s})" for c, s in zip(ft.columns, ft.sizes)],
                "average" + (f" [{conf:.0%} CI]" if conf else ""),
            ]
            rows = []
            for m in order:
                avg = _cell(ft.average[m], unit)
                ci = ft.interval.get(m)
                if ci:
                    avg += f" [{_cell(ci[0], unit)}, {_cell(ci[1], unit)}]"
                rows.append([m, *[_cell(v, unit) for v in ft.rows[m]], avg])
            # The best model of each column (highest accuracy, lowest NLL), ties included.
            strong = set()
            for c in range(len(ft.columns) + 1):
                vals = [(ft.rows[m] + [ft.average[m]])[c] for m in order]
                known = [v for v in vals if v is not None]
                if known and len(set(known)) > 1:
                    best = max(known) if metric == "accuracy" else min(known)
                    strong |= {(r, c + 1) for r, v in enumerate(vals) if v == best}
            doc.table(head, rows, cls="results", strong=strong)
        doc.p(
            "Columns: dataset families (number of datasets); every dataset counts once. Multiple "
            "choice is scored by log-likelihood normalised by answer length; generative answers "
            "by exact match after BIG-bench's post-processing. Intervals: stratified bootstrap "
            "over held-out examples.",
            "muted",
        )
    if rd.comparisons:
        doc.h(3, "Paired comparisons")
        rows = []
        for name, r in rd.comparisons.items():
            n, a = r.get("nll"), r.get("accuracy")
            rows.append(
                [
                    name,
                    f"{100 * a['difference']:+.2f} [{100 * a['ci'][0]:+.2f}, {100 * a['ci'][1]:+.2f}]"
                    if a
                    else "–",
                    f"{a['p_a_better']:.2f}" if a else "–",
                    f"{a['wins']}/{a['ties']}/{a['losses']}" if a else "–",
                    f"{n['difference']:+.4f} [{n['ci'][0]:+.4f}, {n['ci'][1]:+.4f}]" if n else "–",
                    f"{n['p_a_better']:.2f}" if n else "–",
                ]
            )
        doc.table(
            [
                "A vs B",
                "Δ accuracy (pt) [CI]",
                "P(A better)",
                "datasets A/=/B",
                "Δ NLL [CI]",
                "P(A lower NLL)",
            ],
            rows,
        )
        doc.p(
            "Both models resampled with the same examples in every bootstrap draw (paired).",
            "muted",
        )
    doc.raw_html("</section>")

    if rd.timings:
        doc.raw_html('<section id="timings">')
        doc.h(2, "Wall time per stage", "timings-h")
        doc.table(["stage", "seconds"], [[s, f"{v:.0f}"] for s, v in rd.timings.items()])
        doc.raw_html("</section>")

    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("summary", "Summary"),
            ("mixture", "Mixture"),
            ("plan", "Plan"),
            ("branches", "Branches"),
            ("merge", "Merge"),
            ("diagnostics", "Diagnostics"),
            ("results", "Results"),
        )
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(rd.title)}</title><style>{CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{html.escape(rd.title)}</h1>'
        "<p>MERIT: conflict-aware splitting and weight merging — run report</p></div></header>"
        f'<nav><div class="wrap">{nav}</div></nav><main class="wrap">'
        + "\n".join(doc.html)
        + f"</main><script>{DECODE_SCRIPT}</script></body></html>\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    html_path = out_dir / "index.html"
    md_path = out_dir / "report.md"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page)
    tmp.replace(html_path)
    md_path.write_text(f"# {rd.title}\n\n" + "\n".join(doc.md) + "\n")
    return html_path, md_path
