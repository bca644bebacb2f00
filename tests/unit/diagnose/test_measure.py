"""All diagnostics of one run on exact quadratics, where every number is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from merit.diagnose.figures import diagnostic_figures
from merit.diagnose.measure import _loss_evaluations, measure
from merit.diagnose.premises import Objective
from merit.diagnose.verdicts import VERDICT_KEYS


class Quadratic(torch.nn.Module):
    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(len(c), dtype=torch.float64))
        self.register_buffer("c", c)


def quad_loss(m: Quadratic, _batch) -> tuple[torch.Tensor, int]:
    d = m.theta - m.c
    return 0.5 * (d * d).sum() + 1.0, 1  # H = I


SETTINGS = SimpleNamespace(
    alphas=5,
    perturbation_scales=[0.0, 1.0, 2.0],
    perturbation_draws=2,
    lanczos_iters=4,
    top_eigen=2,
    seed=0,
    barrier_tolerance=0.02,
    flatness_tolerance=0.05,
    distance_ratio=1.5,
    gain_agreement=0.5,
)


@pytest.mark.parametrize("with_joint", [True, False])
def test_measure_on_a_quadratic(with_joint):
    n = 6
    g = torch.Generator().manual_seed(0)
    heldout = Objective(Quadratic(torch.randn(n, generator=g, dtype=torch.float64)), [0], quad_loss)
    train = Objective(Quadratic(torch.randn(n, generator=g, dtype=torch.float64)), [0], quad_loss)
    base = torch.zeros(n, dtype=torch.float64)
    branches = [0.3 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    merged = sum(wk * b for wk, b in zip(w, branches))
    joint = 3 * merged if with_joint else None
    d = measure(heldout, train, base, branches, w, merged, joint, SETTINGS)

    # The progress bar's total is exactly the loss evaluations made before the gain.
    assert d.evaluations == _loss_evaluations(3, with_joint, True, SETTINGS)
    assert list(d.losses) == ["θ0", "θ̄", "branch 0", "branch 1", "branch 2"] + (
        ["joint"] if with_joint else []
    )
    kinds = [b["kind"] for b in d.barriers]
    assert kinds == ["branches"] * 3 + ["base-merged"] + (["base-joint"] if with_joint else [])
    # H = I: the gain is exactly ½ Σ w_k ‖δ_k − δ̄‖².
    expect = 0.5 * sum(wk * float(((b - merged) ** 2).sum()) for wk, b in zip(w, branches))
    assert d.gain["measured"] == pytest.approx(expect, rel=1e-9)
    assert d.gain["predicted"] == pytest.approx(expect, rel=1e-9)
    assert d.verdict("gain_is_variance")["holds"] is True
    assert [v["key"] for v in d.verdicts] == list(VERDICT_KEYS)
    if with_joint:
        assert d.distances["ratio_joint_merged"] == pytest.approx(3.0)
        assert d.verdict("near_theta0")["holds"] is True
        assert set(d.generalization) == {"base", "merged", "joint"}
    else:
        assert d.verdict("near_theta0")["holds"] is None and "joint" not in d.perturbation
    assert d.overall
    figs = diagnostic_figures(d)
    assert set(figs) == {"barriers", "distances", "generalization", "perturbation", "gain"}
    assert all(png.startswith(b"\x89PNG") for png in figs.values())
