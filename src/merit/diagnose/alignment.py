"""Does the split target high-curvature directions? Hessian–PCA alignment (the paper: the PCA
conflict directions reach |cos| = 0.133 with the top-10 Hessian eigenvectors at θ0, against
5.6 × 10⁻⁵ for random unit vectors).

The conflict directions in parameter space are the PCA axes mapped back through the normalised
dataset gradients, u_a ∝ Σ_t z_{t,a} ĝ_t (paper §3.2). merit keeps gradients only as
CountSketches S g_t, and S is linear, so S u_a = Σ_t z_{t,a} S g_t / |g_t|; the top Hessian
eigenvectors v_i (Lanczos at θ0) are sketched by the same S, and cos(u_a, v_i) is read in the
sketch, where inner products survive up to an error of about √((1 + cos²)/d) for d buckets.
Random unit directions drawn through the same sketch (a sketched isotropic Gaussian is an
isotropic Gaussian in the buckets) give the baseline the z-score is taken against.

That baseline is the paper's, and a weak one: loss gradients of a trained network lie largely in
its top Hessian eigenspace (Gur-Ari et al., 2018), so any combination of the dataset gradients
aligns far better than a random direction. The second baseline asks whether the PCA axes align
better than random combinations Σ_t c_t ĝ_t of the same gradients (c ~ N(0, I)): the share of
such combinations the conflict axes beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


def unit_gradients(sketches: torch.Tensor, sq_norms: Sequence[float]) -> torch.Tensor:
    """S g_t / |g_t| for each dataset t: rows of a (T, d) tensor."""
    norms = torch.tensor([math.sqrt(max(s, 1e-300)) for s in sq_norms], dtype=torch.float64)
    return sketches.double() / norms[:, None]


def conflict_directions(
    sketches: torch.Tensor, sq_norms: Sequence[float], z: torch.Tensor
) -> torch.Tensor:
    """S u_a = Σ_t z_{t,a} S g_t / |g_t| for each axis a: rows of an (r, d) tensor."""
    return z.double().T @ unit_gradients(sketches, sq_norms)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows of a) × (rows of b) cosines."""
    a, b = a.double(), b.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return a @ b.T


@dataclass
class Alignment:
    """cos(u_a, v_i) for conflict axes a and top eigenvectors i, against random directions."""

    cos: list[list[float]]  # [axis][eigenvector], signed
    max_abs: float  # max over axes and eigenvectors of |cos|
    random_mean: float  # the same statistic for random directions through the same sketch
    random_sd: float
    z: float  # (max_abs − random_mean) / random_sd
    sketch_error: float  # one cosine's standard error from the sketch, √(1/d)
    exact_random: float  # E|cos| of a random unit vector with a fixed one in D dimensions
    dim: int  # D, the parameters
    eigenvalues: list[float]
    # The same statistic for r random combinations of the unit dataset gradients, and the share
    # of those draws whose statistic the conflict axes reach (None: no gradients given).
    span_mean: float | None = None
    span_sd: float | None = None
    span_beaten: float | None = None

    @property
    def targets_curvature(self) -> bool:
        return self.z > 3.0

    def to_json(self) -> dict:
        return {**asdict(self), "targets_curvature": self.targets_curvature}

    def line(self) -> str:
        what = "targets" if self.targets_curvature else "does not target"
        return (
            f"the split {what} high-curvature directions: max |cos| of the {len(self.cos)} "
            f"conflict axes with the top {len(self.eigenvalues)} Hessian eigenvectors at θ0 = "
            f"{self.max_abs:.3f} (sketch error ±{self.sketch_error:.3f}), random directions "
            f"{self.random_mean:.3f} ± {self.random_sd:.3f} through the same sketch (z = "
            f"{self.z:.1f}; exact random unit vectors: {self.exact_random:.1e}; the paper: 0.133 "
            "vs 5.6e-5)" + self._span_line()
        )

    def _span_line(self) -> str:
        if self.span_mean is None:
            return ""
        return (
            f"; random combinations of the dataset gradients reach {self.span_mean:.3f} ± "
            f"{self.span_sd:.3f}, and the conflict axes beat {self.span_beaten:.0%} of them"
        )


def alignment(
    axes: torch.Tensor,
    eigen: torch.Tensor,
    eigenvalues: Sequence[float],
    dim: int,
    draws: int = 200,
    seed: int = 0,
    unit: torch.Tensor | None = None,
) -> Alignment:
    """The alignment of sketched conflict axes (r, d) with sketched eigenvectors (k, d); with
    ``unit`` (the (T, d) unit dataset gradients), against random combinations of them too."""
    c = cosines(axes, eigen)
    stat = float(c.abs().max())
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(draws, axes.shape[0], axes.shape[1], generator=g, dtype=torch.float64)
    base = torch.stack([cosines(r, eigen).abs().max() for r in rand])
    sd = float(base.std()) if draws > 1 else float("nan")
    span = {}
    if unit is not None:
        mix = torch.randn(draws, axes.shape[0], unit.shape[0], generator=g, dtype=torch.float64)
        stats = torch.stack([cosines(m @ unit.double(), eigen).abs().max() for m in mix])
        span = {"span_mean": float(stats.mean()), "span_sd": float(stats.std()),
                "span_beaten": float((stats <= stat).double().mean())}  # fmt: skip
    return Alignment(
        cos=c.tolist(),
        max_abs=stat,
        random_mean=float(base.mean()),
        random_sd=sd,
        z=(stat - float(base.mean())) / sd if sd > 0 else float("inf"),
        sketch_error=axes.shape[1] ** -0.5,
        exact_random=math.sqrt(2 / (math.pi * dim)),
        dim=dim,
        eigenvalues=[float(v) for v in eigenvalues],
        **span,
    )
