"""The run report's own figures (PNG bytes): the mixture, the plan and the branch curves.

The conflict matrix is the plan stage's (:func:`merit.plan.figures.conflict_matrix_figure`), so
the report and ``plan_plots/cosine.png`` show the same picture; the diagnostics figures are the
diagnose stage's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from merit.data.bigbench import family
from merit.diagnose.figures import JOINT_COLOR
from merit.plan.figures import conflict_matrix_figure, group_color, png_bytes, pyplot, styled


@styled
def pca_map_figure(plan: dict) -> bytes:
    """The datasets on the first two conflict axes (or the first axis against the calibration
    loss when r = 1), coloured by group."""
    ds = plan["datasets"]
    groups = np.array([d["group"] for d in ds])
    z = np.array([d["z"] for d in ds]) if ds and ds[0].get("z") else np.zeros((len(ds), 0))
    first = z[:, 0] if z.shape[1] else np.zeros(len(ds))
    fig, ax = pyplot().subplots(figsize=(5.8, 4.2))
    ev = plan.get("explained_variance", [])
    if z.shape[1] >= 2:
        x, y = first, z[:, 1]
        ax.set_ylabel(f"PC2 ({ev[1]:.1%} of variance)" if len(ev) > 1 else "PC2")
    else:
        x = first
        y = np.asarray([d.get("calibration_loss", 0.0) for d in ds])
        ax.set_ylabel("calibration loss at θ0")
    for k in sorted(set(groups.tolist())):
        m = groups == k
        ax.scatter(
            x[m], y[m], s=14, color=group_color(k), label=f"group {k} ({m.sum()})", alpha=0.85
        )
    ax.set_xlabel(f"PC1 ({ev[0]:.1%} of variance)" if ev else "PC1")
    ax.set_title("PCA conflict map (each point a dataset)")
    ax.legend(loc="best", markerscale=1.5)
    return png_bytes(fig)


def plan_figures(plan: dict) -> dict[str, bytes]:
    """The conflict (cosine) matrix ordered by group, and the PCA conflict map."""
    return {"conflict": png_bytes(conflict_matrix_figure(plan)), "pca": pca_map_figure(plan)}


@styled
def loss_curve_figure(branches: Sequence[dict], joint: dict | None) -> bytes | None:
    """Each branch's (and the joint baseline's) training loss against its optimizer step."""
    if not any(m.get("losses") for m in branches) and not (joint and joint.get("losses")):
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 3.4))
    for k, m in enumerate(branches):
        if m.get("losses"):
            s, v = zip(*m["losses"])
            label = f"branch {k} ({len(m['datasets'])} ds)"
            ax.plot(s, v, color=group_color(k), lw=1.4, label=label)
    if joint and joint.get("losses"):
        s, v = zip(*joint["losses"])
        ax.plot(s, v, color=JOINT_COLOR, lw=1.6, ls="--", label="joint (all datasets)")
    ax.set(xlabel="optimizer step", ylabel="train loss (answer tokens)")
    ax.set_title("Branch training curves (each from θ0, no communication)")
    ax.legend()
    return png_bytes(fig)


def coefficients_figure(groups: dict[str, list[float]], weights: Sequence[float]) -> bytes:
    """Learned merge coefficients λ_k^g per layer group (bars), against the average's w_k."""
    fig, ax = pyplot().subplots(figsize=(6.5, 3.2))
    names = list(groups)
    k = len(weights)
    width = 0.8 / k
    for j in range(k):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [groups[g][j] for g in names], width, color=group_color(j), label=f"branch {j}")
        ax.hlines(weights[j], xs[0] - width / 2, xs[-1] + width / 2, colors=group_color(j),
                  linestyles=":", lw=1)  # fmt: skip
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(ylabel="λ_k (dotted: the average's w_k)")
    ax.set_title("Learned merge coefficients per layer group (fitted on the validation split)")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _tokens_by_family(rows: list[dict], plan: dict | None) -> dict[str, dict[int, int]]:
    """family -> plan group -> train tokens."""
    group = {d["name"]: d["group"] for d in plan["datasets"]} if plan else {}
    fams: dict[str, dict[int, int]] = {}
    for r in rows:
        f = fams.setdefault(family(r["name"]), {})
        g = group.get(r["name"], 0)
        f[g] = f.get(g, 0) + r["train_tokens"]
    return fams


@styled
def mixture_figure(data: dict, plan: dict | None, top: int = 24) -> bytes | None:
    """Train tokens per dataset family, coloured by the group its datasets went to."""
    rows = data.get("datasets", [])
    if not rows:
        return None
    fams = _tokens_by_family(rows, plan)
    order = sorted(fams, key=lambda f: -sum(fams[f].values()))
    shown, rest = order[:top], order[top:]
    fig, ax = pyplot().subplots(figsize=(9.5, 3.6))
    ks = sorted({g for f in fams.values() for g in f})
    bottom = np.zeros(len(shown) + (1 if rest else 0))
    for g in ks:
        vals = [fams[f].get(g, 0) for f in shown]
        if rest:
            vals.append(sum(fams[f].get(g, 0) for f in rest))
        ax.bar(range(len(vals)), vals, bottom=bottom, color=group_color(g), label=f"group {g}")
        bottom += np.asarray(vals, dtype=float)
    labels = [f"{f} ({len([r for r in rows if family(r['name']) == f])})" for f in shown]
    if rest:
        labels.append(f"{len(rest)} other families")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("train tokens")
    ax.set_title("The mixture: train tokens per dataset family (datasets), by plan group")
    ax.legend(ncol=min(4, len(ks)))
    return png_bytes(fig)
