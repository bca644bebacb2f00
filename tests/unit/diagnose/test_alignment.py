"""Hessian–PCA alignment read in the CountSketch: the exact cosines within the sketch's error,
a planted alignment found, a random one not."""

from __future__ import annotations

import torch

from merit.calibrate.countsketch import CountSketch, SketchSpec
from merit.diagnose.alignment import alignment, conflict_directions, cosines

D, d = 40_000, 4096


def _sketch(s: CountSketch, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([s.sketch_named([("w", r.float())]) for r in rows])


def _setup(planted: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(6, D, generator=g, dtype=torch.float64) * torch.rand(6, 1, generator=g)
    z = torch.randn(6, 2, generator=g, dtype=torch.float64)
    u = z.T @ (grads / grads.norm(dim=1, keepdim=True))  # the exact conflict directions
    eig, _ = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))
    eig = eig.T
    if planted:  # the top eigenvector is the first conflict axis
        eig[0] = u[0] / u[0].norm()
    return grads, z, u, eig


def test_sketched_cosines_match_the_exact_ones_within_the_sketchs_error():
    grads, z, u, eig = _setup(planted=True)
    s = CountSketch(SketchSpec(d, 3))
    axes = conflict_directions(_sketch(s, grads), (grads**2).sum(1).tolist(), z)
    sketched = cosines(axes, _sketch(s, eig))
    exact = cosines(u, eig)
    err = ((1 + exact**2) / d).sqrt()
    assert (sketched - exact).abs().max() < 4 * err.max()
    assert abs(float(exact[0, 0])) > 0.999


def test_a_planted_alignment_has_a_large_z_and_a_random_one_does_not():
    s = CountSketch(SketchSpec(d, 3))
    for planted in (True, False):
        grads, z, _u, eig = _setup(planted)
        axes = conflict_directions(_sketch(s, grads), (grads**2).sum(1).tolist(), z)
        a = alignment(axes, _sketch(s, eig), [3.0, 2.0, 1.0], D, draws=100)
        if planted:
            assert a.max_abs > 0.95 and a.z > 20 and a.targets_curvature
            assert "targets high-curvature" in a.line()
        else:
            assert a.max_abs < a.random_mean + 4 * a.random_sd and not a.targets_curvature
    assert a.exact_random < 0.01 and abs(a.sketch_error - d**-0.5) < 1e-12


def test_the_gradient_span_control_tells_the_pca_axes_from_any_gradient_combination():
    """When the top eigenvector is the mean gradient direction (as in trained networks), every
    combination of the gradients aligns with it, far above random directions: the span
    control says the conflict axes (orthogonal to the mean here) do not beat those."""
    s = CountSketch(SketchSpec(d, 3))
    grads, _z, _u, eig = _setup(planted=False, seed=1)
    unit_exact = grads / grads.norm(dim=1, keepdim=True)
    mean = unit_exact.sum(0)
    eig[0] = mean / mean.norm()
    # Axes orthogonal to the all-ones weighting of the unit gradients: pure contrasts.
    z = torch.tensor([[1.0, -1.0, 0, 0, 0, 0], [0, 0, 1.0, -1.0, 0, 0]]).T.double()
    sk = _sketch(s, grads)
    axes = conflict_directions(sk, (grads**2).sum(1).tolist(), z)
    unit = sk.double() / grads.norm(dim=1, keepdim=True)
    a = alignment(axes, _sketch(s, eig), [3.0, 2.0, 1.0], D, draws=100, unit=unit)
    assert a.span_mean > 10 * a.random_mean  # gradient combinations align with the mean
    assert a.span_beaten < 0.5 and "beat" in a.line()
    # The mean direction itself beats every random combination.
    top = alignment(_sketch(s, mean[None]), _sketch(s, eig), [3.0, 2.0, 1.0], D, draws=100,
                    unit=unit)  # fmt: skip
    assert top.span_beaten > 0.9
