"""Pictures of a plan, written next to ``plan.json`` as PNG (matplotlib, Agg backend).

The cosine matrix ordered by group with group boundaries; the datasets in the first two PCA
axes, coloured by group and labelled; the scree plot; and how often each dataset lands in its
group when the calibration sample is redrawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(k: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def cosine_plot(plan: dict, path: Path) -> Path:
    plt = _pyplot()
    c = np.asarray(plan["cosine"])
    groups = np.array([d["group"] for d in plan["datasets"]])
    order = np.argsort(groups, kind="stable")
    t = len(order)
    fig, ax = plt.subplots(figsize=(7, 6))
    lim = float(np.abs(c[~np.eye(t, dtype=bool)]).max()) if t > 1 else 1.0
    im = ax.imshow(c[np.ix_(order, order)], cmap="RdBu_r", vmin=-lim, vmax=lim)
    bounds = np.cumsum(np.bincount(groups, minlength=plan["K"]))[:-1]
    for b in bounds:
        ax.axhline(b - 0.5, color="black", lw=1.2)
        ax.axvline(b - 0.5, color="black", lw=1.2)
    if t <= 40:
        names = [plan["datasets"][i]["name"] for i in order]
        ax.set_xticks(range(t), names, rotation=90, fontsize=6)
        ax.set_yticks(range(t), names, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"gradient cosines, ordered by group (K={plan['K']}, {plan.get('method')})")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine (off-diagonal range)")
    return _save(fig, path)


def pca_plot(plan: dict, path: Path) -> Path:
    plt = _pyplot()
    z = np.array([d["z"] + [0.0, 0.0] for d in plan["datasets"]])[:, :2]
    groups = np.array([d["group"] for d in plan["datasets"]])
    colors = _colors(plan["K"])
    ev = [*(plan.get("scree") or plan["explained_variance"]), 0.0, 0.0]
    fig, ax = plt.subplots(figsize=(8, 7))
    for g in range(plan["K"]):
        m = groups == g
        ax.scatter(z[m, 0], z[m, 1], s=22, color=colors[g], label=f"group {g}")
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
    return _save(fig, path)


def scree_plot(plan: dict, path: Path) -> Path:
    plt = _pyplot()
    ev = np.asarray(plan.get("scree") or plan["explained_variance"])[:30]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(1, len(ev) + 1)
    ax.bar(x, ev, color="tab:blue", label="axis")
    ax.plot(x, np.cumsum(ev), color="tab:orange", marker="o", ms=3, label="cumulative")
    ax.axvline(plan["rank"] + 0.5, color="black", ls="--", lw=1, label=f"r = {plan['rank']}")
    ax.set_xlabel("PCA axis of the cosine matrix")
    ax.set_ylabel("explained variance")
    ax.set_ylim(0, 1)
    ax.legend()
    return _save(fig, path)


def stability_plot(plan: dict, path: Path) -> Path | None:
    rows = [d for d in plan["datasets"] if d.get("stability") is not None]
    if not rows:
        return None
    plt = _pyplot()
    rows = sorted(rows, key=lambda d: (d["group"], d["stability"]))
    colors = _colors(plan["K"])
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.06 * len(rows) + 4)), 4))
    ax.bar(
        range(len(rows)),
        [d["stability"] for d in rows],
        color=[colors[d["group"]] for d in rows],
        width=0.9,
    )
    ax.axhline(0.8, color="black", ls="--", lw=1)
    if len(rows) <= 40:
        ax.set_xticks(range(len(rows)), [d["name"] for d in rows], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel("datasets, by group")
    st = plan.get("stability") or {}
    ari = st.get("ari_pairs")
    ax.set_ylabel("share of resampled plans in its group")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        "assignment stability" + (f" (ARI between resampled plans {ari:.2f})" if ari else "")
    )
    return _save(fig, path)


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
