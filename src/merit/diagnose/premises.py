"""Is θ0 merge-ready, and did the merge gain what the local quadratic theory predicts?

The paper's argument (§4) rests on θ0 sitting in a flat, "merge-ready" basin, where the loss near
θ0 is well described by its second-order Taylor expansion. Under that model the merge gains

    G = Σ_k w_k L(θ_k) − L(θ̄)  ≈  G_var = ½ Σ_k w_k (δ_k − δ̄)ᵀ H (δ_k − δ̄),

with δ_k = θ_k − θ0, δ̄ = Σ_k w_k δ_k = θ̄ − θ0 and H the Hessian at θ0 (paper, theorem on
G_var): the gain is the curvature-weighted variance of the branch checkpoints. This module
holds the measurements of the premises (:mod:`merit.diagnose.measure` runs them all on one fixed
set of held-out batches, :mod:`merit.diagnose.verdicts` judges them):

* loss along straight lines between checkpoints and the barrier height (linear mode
  connectivity: the branches stay in one basin);
* distances to θ0 (the merge moves much less than joint training);
* train vs held-out loss (the merge trades train fit for generalisation);
* loss under isotropic Gaussian perturbations (flatness);
* the measured gain against G_var from Hessian-vector products at θ0, split over the top
  Hessian eigen-directions found by Lanczos.

Everything works on flat parameter vectors of one module through :class:`Objective`, so the same
code runs on a language model, a tiny MLP or an exact quadratic (the tests use the last two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.evaluate.scoring import answer_logprobs
from merit.lm import IGNORE, Encoded, pad_batch, trainable_parameters

# (module, batch) -> (summed loss over the batch's units, number of units)
BatchLoss = Callable[[torch.nn.Module, object], tuple[torch.Tensor, int | float]]


class Objective:
    """The mean loss over fixed batches as a function of a module's flat parameter vector.

    ``L(θ) = Σ_b loss_sum_b(θ) / Σ_b count_b``: for a language model the mean NLL over every
    answer token of the batches, exactly the quantity branches are trained on. Tied parameters
    appear once in the vector.

    Hessian-vector products are ``exact`` (double back-propagation, Pearlmutter 1994) or
    ``finite_difference``: [∇L(θ + h v̂) − ∇L(θ − h v̂)] / 2h · ‖v‖ with v̂ = v/‖v‖ and h in
    parameter units — exact for a quadratic, O(h²) otherwise, and it needs only first
    derivatives, so fused attention kernels (which have no second derivative) can be used.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        batches: Sequence[object],
        batch_loss: BatchLoss,
        hvp_method: str = "exact",
        hvp_step: float = 1e-2,
    ):
        if hvp_method not in ("exact", "finite_difference"):
            raise ValueError(f"unknown Hessian-vector product method {hvp_method!r}")
        self.hvp_method = hvp_method
        self.hvp_step = hvp_step
        self.module = module
        self.batches = list(batches)
        self.batch_loss = batch_loss
        named = trainable_parameters(module)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        # float32 vectors (bf16 weights are upcast); float64 when the module is float64.
        wide = any(p.dtype == torch.float64 for p in self.params)
        self.dtype = torch.float64 if wide else torch.float32
        self.evaluations = 0  # loss evaluations, for budgets
        self.hvps = 0
        self.on_evaluation: Callable[[], None] | None = None  # e.g. a progress bar's tick
        self._count: float | None = None

    # -- vectors ----------------------------------------------------------------------------
    def vector(self, module: torch.nn.Module | None = None) -> torch.Tensor:
        """θ of ``module`` (default: the objective's own), in this objective's parameter order."""
        if module is None:
            params = self.params
        else:
            own = dict(module.named_parameters(remove_duplicate=False))
            missing = [n for n in self.names if n not in own]
            if missing:
                raise ValueError(f"the model has no parameter {missing[0]!r}")
            params = [own[n] for n in self.names]
        return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in params]).to(self.device)

    def set(self, theta: torch.Tensor) -> None:
        """Write θ into the module's parameters."""
        if theta.numel() != self.dim:
            raise ValueError(f"θ has {theta.numel()} entries, the model {self.dim}")
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(theta[offset : offset + n].view_as(p).to(p.dtype))
                offset += n

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return out

    @property
    def count(self) -> float:
        if self._count is None:
            with torch.no_grad():
                self._count = float(sum(self.batch_loss(self.module, b)[1] for b in self.batches))
            if self._count <= 0:
                raise ValueError("the diagnostic batches have no loss units (no answer tokens)")
        return self._count

    # -- loss and curvature -----------------------------------------------------------------
    @torch.no_grad()
    def loss(self, theta: torch.Tensor) -> float:
        """L(θ) over all batches."""
        self.set(theta)
        self.module.eval()
        total, count = 0.0, 0.0
        for b in self.batches:
            s, n = self.batch_loss(self.module, b)
            total += float(s)
            count += float(n)
        self.evaluations += 1
        self._count = count
        if self.on_evaluation is not None:
            self.on_evaluation()
        return total / count

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇L(θ)."""
        self.set(theta)
        self.module.eval()
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        count = self.count
        with torch.enable_grad():
            for b in self._backward_pieces():
                s, _ = self.batch_loss(self.module, b)
                grads = torch.autograd.grad(s / count, self.params)
                out += torch.cat([g.reshape(-1).to(self.dtype) for g in grads])
        return out

    def _backward_pieces(self):
        """The batches as back-propagated: a subclass may cut them smaller (memory)."""
        return self.batches

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(θ) v (see the class docstring for the two methods)."""
        if self.hvp_method == "finite_difference":
            n = math.sqrt(wide_dot(v, v))
            if n == 0:
                return torch.zeros_like(v)
            u, h = v / n, self.hvp_step
            out = (self.grad(theta + h * u) - self.grad(theta - h * u)) * (n / (2 * h))
            self.hvps += 1
            return out
        return self._exact_hvp(theta, v)

    def _exact_hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.set(theta)
        self.module.eval()
        vs = self._split(v)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        count = self.count
        with torch.enable_grad():
            for b in self._backward_pieces():
                s, _ = self.batch_loss(self.module, b)
                grads = torch.autograd.grad(s / count, self.params, create_graph=True)
                gv = sum((g * u).sum() for g, u in zip(grads, vs))
                hv = torch.autograd.grad(gv, self.params)
                out += torch.cat([h.reshape(-1).to(self.dtype) for h in hv])
        self.hvps += 1
        return out


class LMObjective(Objective):
    """:class:`Objective` of a causal language model on padded batches (mean answer-token NLL).

    Losses and gradients run with the model's own attention kernel; exact Hessian-vector
    products switch to eager attention, because PyTorch's fused attention kernels have no second
    derivative.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        batches: Sequence[object],
        hvp_method: str = "finite_difference",
        hvp_step: float = 1e-2,
        backward_batch: int = 4,
    ):
        super().__init__(module, batches, lm_batch_loss, hvp_method, hvp_step)
        # The loss units are the label tokens: known without a forward pass.
        self._count = float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in self.batches))
        self.backward_batch = backward_batch

    def _backward_pieces(self):
        """Each batch in slices of ``backward_batch`` rows: a backward pass keeps every layer's
        activations: 32 rows of up to 256 tokens through SmolLM2-135M ran a 24 GB machine out of
        memory. The sum of the slices' gradients is the batch's."""
        m = self.backward_batch
        for b in self.batches:
            rows = len(b["input_ids"])
            if set(b) - {"input_ids", "attention_mask", "labels"}:  # images: rows ≠ examples
                yield b
                continue
            for i in range(0, rows, m):
                yield {k: v[i : i + m] for k, v in b.items()}

    def _exact_hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        setter = getattr(self.module, "set_attn_implementation", None)
        before = getattr(getattr(self.module, "config", None), "_attn_implementation", None)
        if setter is None or before in (None, "eager"):
            return super()._exact_hvp(theta, v)
        setter("eager")
        try:
            return super()._exact_hvp(theta, v)
        finally:
            setter(before)


def lm_batch_loss(
    module: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed answer-token NLL of a padded language-model batch, and its answer tokens."""

    lp, n = answer_logprobs(module, batch)
    return -lp.sum(), int(n.sum())


def lm_batches(
    examples: Sequence[Encoded], batch_size: int, pad_id: int, device
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of similar length (sorted), built once and reused by every diagnostic."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [
        pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id, device)
        for s in range(0, len(order), batch_size)
    ]


# -- loss along straight lines ------------------------------------------------------------------
def interpolation_curve(
    obj: Objective,
    a: torch.Tensor,
    b: torch.Tensor,
    alphas: Sequence[float],
    loss_a: float | None = None,
    loss_b: float | None = None,
) -> dict:
    """L((1−α)a + αb) on the α grid and its excess over the chord (1−α)L(a) + αL(b).

    The barrier height is the largest excess (paper §4; Frankle et al. 2020): ≤ 0 when the
    segment stays below the chord, as in a convex basin.
    """
    la = obj.loss(a) if loss_a is None else loss_a
    lb = obj.loss(b) if loss_b is None else loss_b
    losses = []
    for al in alphas:
        if al == 0:
            losses.append(la)
        elif al == 1:
            losses.append(lb)
        else:
            losses.append(obj.loss(torch.lerp(a, b, float(al))))
    chord = [(1 - al) * la + al * lb for al in alphas]
    excess = [lo - c for lo, c in zip(losses, chord)]
    return {
        "alpha": [float(x) for x in alphas],
        "loss": losses,
        "chord": chord,
        "excess": excess,
        "barrier": max(excess),
    }


# -- distances ----------------------------------------------------------------------------------
def distances(base: torch.Tensor, models: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖θ − θ0‖ for each named model (Euclidean, over every parameter)."""
    return {k: math.sqrt(wide_dot(d := v - base, d)) for k, v in models.items()}


# -- flatness -----------------------------------------------------------------------------------
def gaussian_direction(dim: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ε ~ N(0, I): drawn on the CPU so a seed gives the same direction on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def perturbation_curve(
    obj: Objective,
    theta: torch.Tensor,
    sigmas: Sequence[float],
    draws: int,
    seed: int = 0,
    loss_theta: float | None = None,
) -> dict:
    """Mean loss at θ + σε over ``draws`` antithetic pairs (ε and −ε), for each σ.

    Antithetic pairs cancel the first-order term gᵀε exactly, so the curve is flat at σ = 0
    (E L(θ + σε) = L(θ) + ½σ² tr H + O(σ⁴)) with a handful of draws, and two models perturbed
    with the same seed see the same directions.
    """
    l0 = obj.loss(theta) if loss_theta is None else loss_theta
    per_sigma: list[list[float]] = []
    for s in sigmas:
        if s == 0:
            per_sigma.append([l0] * (2 * draws))
            continue
        vals = []
        for d in range(draws):
            eps = gaussian_direction(obj.dim, seed + d, theta.device, theta.dtype)
            vals.append(obj.loss(theta + s * eps))
            vals.append(obj.loss(theta - s * eps))
        per_sigma.append(vals)
    return {
        "sigma": [float(s) for s in sigmas],
        "mean": [float(np.mean(v)) for v in per_sigma],
        "std": [float(np.std(v)) for v in per_sigma],
        "losses": per_sigma,
        "loss": l0,
    }


# -- the merging gain and its quadratic prediction ----------------------------------------------
def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    iters: int,
    seed: int = 0,
    device=None,
    dtype=torch.float32,
) -> tuple[np.ndarray, torch.Tensor]:
    """Ritz values (descending) and vectors (rows) of a symmetric operator after ``iters`` steps.

    Full re-orthogonalisation (twice, classical Gram-Schmidt) keeps the Krylov basis exact to
    rounding, so the extreme eigenpairs converge first and no ghost copies appear.
    """
    iters = max(1, min(iters, dim))
    q = gaussian_direction(dim, seed, device, dtype)
    q = q / torch.linalg.vector_norm(q)
    basis = [q]
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(iters):
        w = matvec(basis[j]).to(basis[0].dtype)
        a = wide_dot(w, basis[j])
        alpha.append(a)
        w = w - a * basis[j]
        if j > 0:
            w.sub_(basis[j - 1], alpha=beta[-1])
        for _ in range(2):  # classical Gram-Schmidt, vector by vector: no stacked copy
            for c, q_i in [(wide_dot(q_i, w), q_i) for q_i in basis]:
                w.sub_(q_i, alpha=c)
        b = math.sqrt(wide_dot(w, w))
        if j == iters - 1 or b < 1e-10 * max(1.0, abs(a)):
            break
        beta.append(b)
        basis.append(w / b)
    m = len(alpha)
    t = np.diag(alpha) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    vals, vecs = np.linalg.eigh(t)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    q_mat = torch.stack(basis[:m])
    ritz = torch.from_numpy(vecs.T.copy()).to(q_mat) @ q_mat
    return vals, ritz


@dataclass
class Gain:
    measured: float
    predicted: float
    branch_losses: list[float]
    merged_loss: float
    weights: list[float]
    predicted_per_branch: list[float]
    eigenvalues: list[float] = field(default_factory=list)
    eigen_split: list[float] = field(default_factory=list)  # contribution of each direction
    vectors: torch.Tensor | None = field(default=None, repr=False)  # top eigenvectors (rows)

    @property
    def explained_by_top(self) -> float:
        return sum(self.eigen_split)

    def as_dict(self) -> dict:
        return {
            "measured": self.measured,
            "predicted": self.predicted,
            "ratio": self.predicted / self.measured if self.measured else None,
            "branch_losses": self.branch_losses,
            "merged_loss": self.merged_loss,
            "weights": self.weights,
            "predicted_per_branch": self.predicted_per_branch,
            "eigenvalues": self.eigenvalues,
            "eigen_split": self.eigen_split,
            "rest": self.predicted - self.explained_by_top,
        }


def merging_gain(
    obj: Objective,
    base: torch.Tensor,
    branches: Sequence[torch.Tensor],
    weights: Sequence[float],
    merged: torch.Tensor | None = None,
    branch_losses: Sequence[float] | None = None,
    merged_loss: float | None = None,
    lanczos_iters: int = 0,
    top: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> Gain:
    """Measured gain Σ w_k L(θ_k) − L(θ̄) against ½ Σ w_k (δ_k − δ̄)ᵀ H(θ0) (δ_k − δ̄).

    ``merged`` defaults to Σ w_k θ_k (pass the saved merge to measure the model users get).
    With ``lanczos_iters`` > 0 the prediction is also split over the top Hessian eigen-directions
    u_i: ½ Σ_k w_k λ_i (u_iᵀ(δ_k − δ̄))²; what they leave is the rest of the spectrum.
    """
    w = [float(x) for x in weights]
    if abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"merge weights sum to {sum(w)}, not 1")
    mean = sum(wk * t for wk, t in zip(w, branches))
    merged = mean if merged is None else merged
    bl = [obj.loss(t) for t in branches] if branch_losses is None else list(branch_losses)
    ml = obj.loss(merged) if merged_loss is None else merged_loss
    # δ_k − δ̄ = θ_k − Σ_j w_j θ_j: θ0 cancels, only the curvature is taken at θ0.
    devs = [t - mean for t in branches]
    per_branch = []
    for d in tqdm(devs, desc="HVP at θ0", disable=not progress, leave=False):
        per_branch.append(0.5 * wide_dot(d, obj.hvp(base, d)))
    predicted = sum(wk * p for wk, p in zip(w, per_branch))
    gain = Gain(
        measured=sum(wk * lk for wk, lk in zip(w, bl)) - ml,
        predicted=predicted,
        branch_losses=bl,
        merged_loss=ml,
        weights=w,
        predicted_per_branch=[wk * p for wk, p in zip(w, per_branch)],
    )
    if lanczos_iters > 0:
        bar = tqdm(total=lanczos_iters, desc="Lanczos at θ0", disable=not progress, leave=False)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return obj.hvp(base, v)

        vals, vecs = lanczos(matvec, obj.dim, lanczos_iters, seed, base.device, base.dtype)
        bar.close()
        k = min(top, len(vals))
        gain.eigenvalues = [float(v) for v in vals[:k]]
        # (k, K): (u_iᵀ d_k)², pair by pair: stacking the K deviations in float64 took 8 bytes
        # a parameter a branch (4.3 GB for SmolLM2's 4 branches).
        proj = torch.tensor([[wide_dot(u, d) ** 2 for d in devs] for u in vecs[:k]],
                            dtype=torch.float64, device=vecs.device)  # fmt: skip
        wt = torch.tensor(w, dtype=torch.float64, device=proj.device)
        lam = torch.tensor(gain.eigenvalues, dtype=torch.float64, device=proj.device)
        gain.eigen_split = (0.5 * lam * (proj @ wt)).tolist()
        gain.vectors = vecs[:k]
    return gain


def wide_dot(a: torch.Tensor, b: torch.Tensor, piece: int = 1 << 22) -> float:
    """⟨a, b⟩ accumulated in float64 a piece at a time (no vector-sized float64 copy)."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for i in range(0, a.numel(), piece):
        total += float(torch.dot(a[i : i + piece].double(), b[i : i + piece].to(a.device).double()))
    return total


def relative_sigmas(scales: Sequence[float], step: float, dim: int) -> list[float]:
    """σ such that ‖σε‖ ≈ scale × ``step`` for ε ~ N(0, I_dim) (‖ε‖ ≈ √dim)."""
    return [float(s) * step / math.sqrt(dim) for s in scales]
