"""How many calibration samples does a representative gradient need? (The paper: the cosine of an
n-sample calibration gradient with a 1,000-sample reference saturates near n = 200, 0.847 ± 0.106
over 100 Vision-FLAN tasks.)

For a dataset, the n-sample gradients come free from the calibration's part sketches: the
token-weighted mean of m of its M disjoint parts is the sketch of the gradient over those parts'
examples (the sketch is linear). Their cosine with the sketch of a reference gradient — over
examples the calibration never saw, several times as many — is taken in the parts' folded
sketch space, where inner products are preserved up to the sketch's error.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from merit.artifacts import Artifact


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def subset_curve(
    parts: torch.Tensor,
    part_tokens: Sequence[int],
    part_examples: Sequence[int],
    reference: torch.Tensor,
    draws: int,
    seed: int,
) -> list[dict]:
    """For m = 1..M parts: the mean and sd over ``draws`` random m-subsets of the cosine between
    the subset's gradient (token-weighted mean of its part sketches) and ``reference``, at the
    subset's mean number of examples."""
    rng = random.Random(seed)
    m_all = parts.shape[0]
    out = []
    for m in range(1, m_all + 1):
        subsets = [sorted(rng.sample(range(m_all), m)) for _ in range(draws if m < m_all else 1)]
        cos, sizes = [], []
        for s in subsets:
            w = torch.tensor([part_tokens[i] for i in s], dtype=torch.float64)
            g = (w[:, None] * parts[s].double()).sum(0) / w.sum()
            cos.append(cosine(g, reference))
            sizes.append(sum(part_examples[i] for i in s))
        out.append({"n": float(np.mean(sizes)), "mean": float(np.mean(cos)),
                    "sd": float(np.std(cos))})  # fmt: skip
    return out


def recommend(curve: Sequence[dict], share: float = 0.95) -> dict:
    """The smallest n whose mean cosine reaches ``share`` of the cosine at the largest n."""
    top = curve[-1]["mean"]
    n = next(p["n"] for p in curve if p["mean"] >= share * top)
    return {"n": n, "share": share, "cosine_at_n": next(p["mean"] for p in curve if p["n"] == n),
            "cosine_at_max": top, "max_n": curve[-1]["n"]}  # fmt: skip


@dataclass
class Sensitivity(Artifact):
    """``calibration/sensitivity.json``: per sampled dataset, the cosine of the n-sample
    calibration gradient with a larger reference, and the mixture's mean curve."""

    reference_examples: dict[str, int]  # per dataset
    curves: dict[str, list[dict]]
    mean_curve: list[dict] = field(default_factory=list)
    recommendation: dict = field(default_factory=dict)
    note: str = ""  # why there is no curve, when there is none
    sketch_error: float = 0.0  # the cosine's standard error from the sketch alone, ≈ 1/√d

    def line(self) -> str:
        if self.note:
            return self.note
        r = self.recommendation
        return (
            f"calibration size: n = {r['n']:.0f} reaches {r['share']:.0%} of the cosine with a "
            f"{max(self.reference_examples.values())}-example reference that n = {r['max_n']:.0f} "
            f"reaches ({r['cosine_at_n']:.3f} vs {r['cosine_at_max']:.3f}; mean of "
            f"{len(self.curves)} datasets; the paper: 0.847 at n = 200 against 1,000)"
        )


def mean_curve(curves: dict[str, list[dict]]) -> list[dict]:
    """The datasets' curves averaged point by point (by number of parts m): mean ± sd."""
    length = min(len(c) for c in curves.values())
    out = []
    for m in range(length):
        means = [c[m]["mean"] for c in curves.values()]
        ns = [c[m]["n"] for c in curves.values()]
        out.append({"n": float(np.mean(ns)), "mean": float(np.mean(means)),
                    "sd": float(np.std(means))})  # fmt: skip
    return out


def sensitivity_figure(s: Sensitivity) -> bytes:
    """Each dataset's curve (thin) and the mean ± sd over datasets (thick, shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for c in s.curves.values():
        ax.plot([p["n"] for p in c], [p["mean"] for p in c], color="0.75", lw=0.8)
    n = np.array([p["n"] for p in s.mean_curve])
    mu = np.array([p["mean"] for p in s.mean_curve])
    sd = np.array([p["sd"] for p in s.mean_curve])
    ax.plot(n, mu, color="C0", lw=2, label="mean over datasets")
    ax.fill_between(n, mu - sd, mu + sd, color="C0", alpha=0.2, label="± sd")
    if s.recommendation:
        ax.axvline(s.recommendation["n"], color="C3", ls=":", label="recommended n")
    ax.set(xlabel="calibration examples n", ylabel="cos(g_n, g_reference)")
    ax.set_title("Calibration size: n-sample gradient vs a larger reference")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
