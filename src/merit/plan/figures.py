"""Pictures of a plan, written next to ``plan.json`` as PNG (matplotlib, Agg backend).

The cosine matrix ordered by group with group boundaries; the datasets in the first two PCA
axes, coloured by group and labelled; the scree plot; and how often each dataset lands in its
group when the calibration sample is redrawn.

The plot style and the group palette live here, the first stage that draws, so that the
diagnostics and the run report (later stages) draw every group in the same colour and reuse
:func:`conflict_matrix_figure` for the one conflict-matrix picture.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)

# One colour per plan group, everywhere (plan plots, diagnostics, report).
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
STYLE = {
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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styled(build: F) -> F:
    """Run a figure builder under :data:`STYLE` without touching the caller's rcParams."""

    @wraps(build)
    def wrapper(*args, **kwargs):
        with pyplot().rc_context(STYLE):
            return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def group_color(k: int) -> str:
    return GROUP_COLORS[k % len(GROUP_COLORS)]


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (white background, tight box); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    pyplot().close(fig)
    return buf.getvalue()


def _save(fig, path: Path) -> Path:
    Path(path).write_bytes(png_bytes(fig))
    return path


@styled
def conflict_matrix_figure(plan: dict):
    """The cosine matrix C_ij of representative gradients (paper §3.2), datasets ordered by
    group (and by their first conflict coordinate within a group), group boundaries drawn."""
    plt = pyplot()
    ds = plan["datasets"]
    groups = np.array([d["group"] for d in ds])
    first = np.array([(d.get("z") or [0.0])[0] for d in ds], dtype=float)
    order = np.lexsort((first, groups))
    c = np.asarray(plan["cosine"])[np.ix_(order, order)]
    n = len(ds)
    fig, ax = plt.subplots(figsize=(5.8, 5.0))
    # The diagonal is 1 and a few outliers would wash out the rest: clip at the 98% quantile.
    lim = float(np.quantile(np.abs(c[~np.eye(n, dtype=bool)]), 0.98)) if n > 1 else 1.0
    im = ax.imshow(c, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.grid(False)
    cuts = np.flatnonzero(np.diff(groups[order])) + 0.5
    for cut in cuts:
        ax.axhline(cut, color="black", lw=0.8)
        ax.axvline(cut, color="black", lw=0.8)
    starts = [0, *(cuts + 0.5).astype(int).tolist(), n]
    mids = [(starts[k] + starts[k + 1] - 1) / 2 for k in range(len(starts) - 1)]
    ax.set_xticks(mids, [f"group {groups[order][s]}" for s in starts[:-1]])
    ax.tick_params(axis="x", length=0)
    if n <= 40:
        ax.set_yticks(range(n), [ds[i]["name"] for i in order], fontsize=6)
    else:
        ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine of representative gradients")
    method = plan.get("method", "median")
    ax.set_title(f"Conflict matrix, datasets ordered by group (K={plan['K']}, {method})")
    return fig


def cosine_plot(plan: dict, path: Path) -> Path:
    return _save(conflict_matrix_figure(plan), path)


@styled
def _pca_figure(plan: dict):
    plt = pyplot()
    z = np.array([d["z"] + [0.0, 0.0] for d in plan["datasets"]])[:, :2]
    groups = np.array([d["group"] for d in plan["datasets"]])
    ev = [*(plan.get("scree") or plan["explained_variance"]), 0.0, 0.0]
    fig, ax = plt.subplots(figsize=(8, 7))
    for g in range(plan["K"]):
        m = groups == g
        ax.scatter(z[m, 0], z[m, 1], s=22, color=group_color(g), label=f"group {g}")
    # Many datasets: label the 40 farthest from the centre (the rest would be an ink blot).
    far = np.argsort(-np.hypot(z[:, 0], z[:, 1]))[:40]
    for i in far:
        ax.annotate(plan["datasets"][i]["name"][:28], tuple(z[i]), fontsize=6, alpha=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"conflict axis 1 ({ev[0]:.1%})")
    ax.set_ylabel(f"conflict axis 2 ({ev[1]:.1%})")
    ax.set_title("datasets in the first two PCA axes of the cosine matrix")
    ax.legend(fontsize=8)
    return fig


def pca_plot(plan: dict, path: Path) -> Path:
    return _save(_pca_figure(plan), path)


@styled
def _scree_figure(plan: dict):
    plt = pyplot()
    ev = np.asarray(plan.get("scree") or plan["explained_variance"])[:30]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(1, len(ev) + 1)
    ax.bar(x, ev, color=GROUP_COLORS[0], label="axis")
    ax.plot(x, np.cumsum(ev), color=GROUP_COLORS[1], marker="o", ms=3, label="cumulative")
    ax.axvline(plan["rank"] + 0.5, color="black", ls="--", lw=1, label=f"r = {plan['rank']}")
    ax.set_xlabel("PCA axis of the cosine matrix")
    ax.set_ylabel("explained variance")
    ax.set_ylim(0, 1)
    ax.legend()
    return fig


def scree_plot(plan: dict, path: Path) -> Path:
    return _save(_scree_figure(plan), path)


@styled
def _stability_figure(plan: dict, rows: list[dict]):
    plt = pyplot()
    rows = sorted(rows, key=lambda d: (d["group"], d["stability"]))
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.06 * len(rows) + 4)), 4))
    ax.bar(
        range(len(rows)),
        [d["stability"] for d in rows],
        color=[group_color(d["group"]) for d in rows],
        width=0.9,
    )
    ax.axhline(0.8, color="black", ls="--", lw=1)
    if len(rows) <= 40:
        ax.set_xticks(range(len(rows)), [d["name"] for d in rows], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel("datasets, by group")
    ari = (plan.get("stability") or {}).get("ari_pairs")
    ax.set_ylabel("share of resampled plans in its group")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        "assignment stability" + (f" (ARI between resampled plans {ari:.2f})" if ari else "")
    )
    return fig


def stability_plot(plan: dict, path: Path) -> Path | None:
    rows = [d for d in plan["datasets"] if d.get("stability") is not None]
    if not rows:
        return None
    return _save(_stability_figure(plan, rows), path)


def write_plan_plots(plan: dict, out_dir: str | Path) -> list[Path]:
    """cosine.png, pca.png, scree.png and (when measured) stability.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        cosine_plot(plan, out / "cosine.png"),
        pca_plot(plan, out / "pca.png"),
        scree_plot(plan, out / "scree.png"),
        stability_plot(plan, out / "stability.png"),
    ]
    return [p for p in paths if p is not None]
