"""The diagnostics figures (paper §4) as PNG bytes: barriers, distances, train vs held-out loss,
flatness and the merging gain against its quadratic prediction.

``merit diagnose`` writes them to ``diagnostics/*.png``; the run report embeds the same bytes.
"""

from __future__ import annotations

import numpy as np

from merit.diagnose.artifact import Diagnostics
from merit.plan.figures import group_color, png_bytes, pyplot, styled

MERGED_COLOR, JOINT_COLOR = "#222222", "#C44E52"
# Display names of the generalization / perturbation keys.
PRETTY = {"base": "θ0", "merged": "θ̄ (merged)", "joint": "joint"}


def _line_style(i: int, kind: str) -> dict:
    if kind == "branches":
        return {"color": group_color(i), "lw": 1.4, "alpha": 0.85}
    if kind == "base-merged":
        return {"color": MERGED_COLOR, "lw": 2.2}
    return {"color": JOINT_COLOR, "lw": 2.0, "ls": "--"}


@styled
def barriers_figure(bars: list[dict]) -> bytes:
    """Loss along each straight line, and its excess over the chord (the barrier curve)."""
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(9.5, 3.4))
    for i, b in enumerate(bars):
        kw = _line_style(i, b["kind"])
        label = f"{b['label']} (barrier {b['barrier']:+.3f})"
        ax1.plot(b["alpha"], b["loss"], marker="o", ms=3, label=label, **kw)
        ax2.plot(b["alpha"], b["excess"], marker="o", ms=3, **kw)
    ax1.set(xlabel="α (0 = first endpoint, 1 = second)", ylabel="held-out loss (nats/token)")
    ax1.set_title("Loss along straight lines")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set(xlabel="α", ylabel="loss − chord between endpoints")
    ax2.set_title("Barrier curves (> 0: a ridge between the endpoints)")
    ax1.legend(loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2)
    return png_bytes(fig)


@styled
def distances_figure(dist: dict) -> bytes:
    """‖θ − θ0‖ of each branch, θ̄ and joint."""
    k = len(dist["branches"])
    labels = [f"branch {i}" for i in range(k)] + ["θ̄ (merged)"]
    values = [*dist["branches"], dist["merged"]]
    colors = [group_color(i) for i in range(k)] + [MERGED_COLOR]
    if dist.get("joint") is not None:
        labels.append("joint")
        values.append(dist["joint"])
        colors.append(JOINT_COLOR)
    fig, ax = pyplot().subplots(figsize=(6.5, 0.45 * len(labels) + 1.0))
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
    return png_bytes(fig)


@styled
def generalization_figure(gen: dict[str, dict]) -> bytes:
    """Train vs held-out loss of θ0, θ̄ and joint."""
    names = [n for n in PRETTY if n in gen]
    fig, ax = pyplot().subplots(figsize=(5.5, 3.2))
    x = np.arange(len(names))
    tr = [gen[n]["train"] for n in names]
    he = [gen[n]["heldout"] for n in names]
    ax.bar(x - 0.18, tr, 0.36, label="train", color="#9DB4D6")
    ax.bar(x + 0.18, he, 0.36, label="held-out", color="#4C72B0")
    for xi, a, b in zip(x, tr, he):
        ax.text(xi - 0.18, a, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
        ax.text(xi + 0.18, b, f"{b:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [PRETTY[n] for n in names])
    lo = min(tr + he)
    ax.set_ylim(lo - 0.15 * abs(lo), max(tr + he) * 1.06)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Train vs held-out loss")
    ax.legend()
    return png_bytes(fig)


@styled
def perturbation_figure(pert: dict) -> bytes:
    """Loss rise under isotropic Gaussian perturbations, θ̄ and joint."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    for key, color in (("merged", MERGED_COLOR), ("joint", JOINT_COLOR)):
        c = pert.get(key)
        if not c:
            continue
        rise = np.array(c["mean"]) - c["loss"]
        ax.errorbar(
            pert["scales"],
            rise,
            yerr=np.array(c["std"]),
            color=color,
            marker="o",
            ms=4,
            capsize=3,
            label=PRETTY[key],
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set(
        xlabel="perturbation norm ‖σε‖ / ‖θ̄ − θ0‖",
        ylabel="loss rise over the unperturbed model",
    )
    ax.set_title("Flatness: isotropic Gaussian perturbations")
    ax.legend()
    return png_bytes(fig)


def _gain_bars(ax, g: dict) -> None:
    ax.bar([0], [g["measured"]], 0.6, color="#2E4057", label="measured")
    bottom = 0.0
    for k, p in enumerate(g["predicted_per_branch"]):
        ax.bar([1], [p], 0.6, bottom=bottom, color=group_color(k), alpha=0.9, label=f"branch {k}")
        bottom += p
    ax.set_xticks([0, 1], ["measured\nΣ w_k L(θ_k) − L(θ̄)", "predicted\n½ Σ w_k dᵀ H d"])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("gain (nats/token)")
    ratio = g.get("ratio")
    ax.set_title("Merging gain vs quadratic theory" + (f" (ratio {ratio:.2f})" if ratio else ""))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)


def _gain_split(ax, g: dict) -> None:
    split = g["eigen_split"]
    labels = [f"u{i + 1}\nλ={lam:.3g}" for i, lam in enumerate(g["eigenvalues"])] + ["rest"]
    vals = [*split, g["rest"]]
    ax.bar(range(len(vals)), vals, color=["#4C72B0"] * len(split) + ["#BBBBBB"])
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    share = sum(split) / g["predicted"] if g["predicted"] else float("nan")
    ax.set_title(f"Prediction by Hessian direction (top {len(split)}: {share:.0%})")


@styled
def gain_figure(g: dict) -> bytes:
    """Measured gain against ½ Σ w_k (δ_k − δ̄)ᵀ H (δ_k − δ̄), and its split over the top
    Hessian eigen-directions when Lanczos ran."""
    ncols = 2 if g.get("eigen_split") else 1
    fig, axes = pyplot().subplots(1, ncols, figsize=(4.8 * ncols, 3.4), squeeze=False)
    _gain_bars(axes[0, 0], g)
    if ncols == 2:
        _gain_split(axes[0, 1], g)
    return png_bytes(fig)


def diagnostic_figures(diag: Diagnostics) -> dict[str, bytes]:
    """PNG bytes of each diagnostics figure that has data: barriers, distances,
    generalization, perturbation, gain."""
    out: dict[str, bytes] = {}
    if diag.barriers:
        out["barriers"] = barriers_figure(diag.barriers)
    if diag.distances:
        out["distances"] = distances_figure(diag.distances)
    if diag.generalization:
        out["generalization"] = generalization_figure(diag.generalization)
    if diag.perturbation and diag.perturbation.get("merged"):
        out["perturbation"] = perturbation_figure(diag.perturbation)
    if diag.gain and len(diag.gain.get("weights", [])) > 1:
        out["gain"] = gain_figure(diag.gain)
    return out
