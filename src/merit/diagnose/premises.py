"""Is θ0 merge-ready, and did the merge gain what the local quadratic theory predicts?

The paper's argument (§4) rests on θ0 sitting in a flat, "merge-ready" basin, where the loss near
θ0 is well described by its second-order Taylor expansion. Under that model the merge gains

    G = Σ_k w_k L(θ_k) − L(θ̄)  ≈  G_var = ½ Σ_k w_k (δ_k − δ̄)ᵀ H (δ_k − δ̄),

with δ_k = θ_k − θ0, δ̄ = Σ_k w_k δ_k = θ̄ − θ0 and H the Hessian at θ0 (paper, theorem on
G_var): the gain is the curvature-weighted variance of the branch checkpoints. This module
measures the premises on one fixed set of held-out batches:

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.lm import IGNORE, Encoded, pad_batch, trainable_parameters

T = TypeVar("T")
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
        progress: bool = False,
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
        self.progress = progress
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
            for b in self.batches:
                s, _ = self.batch_loss(self.module, b)
                grads = torch.autograd.grad(s / count, self.params)
                out += torch.cat([g.reshape(-1).to(self.dtype) for g in grads])
        return out

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(θ) v (see the class docstring for the two methods)."""
        if self.hvp_method == "finite_difference":
            n = float(torch.linalg.vector_norm(v.double()))
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
            for b in self.batches:
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
        progress: bool = False,
        hvp_method: str = "finite_difference",
        hvp_step: float = 1e-2,
    ):
        super().__init__(module, batches, lm_batch_loss, progress, hvp_method, hvp_step)
        # The loss units are the label tokens: known without a forward pass.
        self._count = float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in self.batches))

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
    from merit.evaluate.scoring import answer_logprobs

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


def stratified_sample(per_dataset: dict[str, Sequence[T]], n: int, seed: int) -> list[T]:
    """``n`` examples spread over datasets as evenly as possible (round-robin, seeded)."""
    rng = np.random.default_rng(seed)
    names = sorted(k for k, v in per_dataset.items() if v)
    pools = {k: list(rng.permutation(len(per_dataset[k]))) for k in names}
    order = [names[i] for i in rng.permutation(len(names))]
    out: list[T] = []
    while len(out) < n and any(pools.values()):
        for k in order:
            if pools[k] and len(out) < n:
                out.append(per_dataset[k][pools[k].pop()])
    return out


# -- 1. loss along straight lines ---------------------------------------------------------------
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


# -- 2. distances -------------------------------------------------------------------------------
def distances(base: torch.Tensor, models: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖θ − θ0‖ for each named model (Euclidean, over every parameter)."""
    return {k: float(torch.linalg.vector_norm((v - base).double())) for k, v in models.items()}


# -- 4. flatness --------------------------------------------------------------------------------
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


# -- 5. the merging gain and its quadratic prediction -------------------------------------------
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
        a = float(torch.dot(w.double(), basis[j].double()))
        alpha.append(a)
        w = w - a * basis[j]
        if j > 0:
            w = w - beta[-1] * basis[j - 1]
        stack = torch.stack(basis)
        for _ in range(2):
            w = w - stack.T @ (stack @ w)
        b = float(torch.linalg.vector_norm(w.double()))
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
        per_branch.append(0.5 * float(torch.dot(d.double(), obj.hvp(base, d).double())))
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
        dev = torch.stack(devs).to(vecs)  # (K, n)
        proj = (vecs[:k].double() @ dev.double().T) ** 2  # (k, K): (u_iᵀ d_k)²
        wt = torch.tensor(w, dtype=torch.float64, device=proj.device)
        lam = torch.tensor(gain.eigenvalues, dtype=torch.float64, device=proj.device)
        gain.eigen_split = (0.5 * lam * (proj @ wt)).tolist()
    return gain


# -- verdicts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """When a premise counts as holding; see :class:`merit.config.DiagnosticsConfig`."""

    barrier: float = 0.02  # largest barrier, as a fraction of the endpoints' mean loss
    flatness: float = 0.05  # loss rise at the reference perturbation, as a fraction of the loss
    distance_ratio: float = 1.5  # ‖θ_joint − θ0‖ / ‖θ̄ − θ0‖ at least this
    gain_agreement: float = 0.5  # |predicted − measured| ≤ this × |measured|


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdicts(diag: dict, th: Thresholds = Thresholds()) -> list[dict]:
    """One plain-words verdict per premise: ``{"premise", "holds" (True/False/None), "why"}``.

    ``diag`` is the dictionary :func:`merit.pipeline.diagnose` writes (keys ``barriers``,
    ``distances``, ``generalization``, ``perturbation``, ``gain``).
    """
    out = []
    bars = [b for b in diag.get("barriers", []) if b["kind"] == "branches"]
    if bars:
        worst = max(bars, key=lambda b: b["barrier"] / max(1e-12, np.mean(b["ends"])))
        rel = worst["barrier"] / max(1e-12, float(np.mean(worst["ends"])))
        holds = rel <= th.barrier
        why = (
            f"the largest barrier between two branches ({worst['label']}) is "
            f"{worst['barrier']:+.4f} nats, {_pct(rel)} of the endpoints' loss"
            + (
                f" (tolerance {_pct(th.barrier)}): the branches stay in one basin, so averaging "
                "them does not climb a ridge."
                if holds
                else f", above the {_pct(th.barrier)} tolerance: the straight path between "
                "these branches climbs a ridge, so their average leaves the basin."
            )
        )
    else:
        holds, why = None, "only one branch: there is no pair of branches to connect."
    out.append({"premise": "one basin (linear mode connectivity)", "holds": holds, "why": why})

    dist = diag.get("distances", {})
    merged, joint = dist.get("merged"), dist.get("joint")
    if merged and joint:
        ratio = joint / merged
        holds = ratio >= th.distance_ratio
        why = (
            f"θ̄ moved {merged:.3g} from θ0, joint training {joint:.3g}: {ratio:.2f}× farther "
            f"(the paper measures 2.4–2.9×; required ≥ {th.distance_ratio:g}×). "
            + (
                "The merge stays in θ0's neighbourhood, where the local theory applies."
                if holds
                else "The merge is not much closer to θ0 than joint training."
            )
        )
    else:
        holds, why = None, "no joint baseline to compare distances with."
    out.append({"premise": "the merge stays near θ0", "holds": holds, "why": why})

    pert = diag.get("perturbation", {})
    ref = pert.get("reference_index")
    if pert.get("merged") and ref is not None:
        m = pert["merged"]
        rise = (m["mean"][ref] - m["loss"]) / max(1e-12, abs(m["loss"]))
        holds = rise <= th.flatness
        extra = ""
        if pert.get("joint"):
            j = pert["joint"]
            rj = (j["mean"][ref] - j["loss"]) / max(1e-12, abs(j["loss"]))
            extra = f" (the joint model: {_pct(rj)})"
        why = (
            f"a random step as long as the merge displacement raises θ̄'s loss by {_pct(rise)}"
            f"{extra}; tolerance {_pct(th.flatness)}. "
            + (
                "The basin is flat at the scale of the merge."
                if holds
                else "The basin is sharp at the scale of the merge: small moves cost loss."
            )
        )
    else:
        holds, why = None, "no perturbation curve."
    out.append({"premise": "a flat basin", "holds": holds, "why": why})

    gen = diag.get("generalization", {})
    if "merged" in gen and "joint" in gen:
        gm = gen["merged"]["heldout"] - gen["merged"]["train"]
        gj = gen["joint"]["heldout"] - gen["joint"]["train"]
        holds = gm <= gj
        why = (
            f"train → held-out loss: θ̄ {gen['merged']['train']:.4f} → "
            f"{gen['merged']['heldout']:.4f} (gap {gm:+.4f}), joint "
            f"{gen['joint']['train']:.4f} → {gen['joint']['heldout']:.4f} (gap {gj:+.4f}). "
            + (
                "The merge generalises at least as well as joint training relative to its fit."
                if holds
                else "The merge has the larger generalisation gap."
            )
        )
    else:
        holds, why = None, "no joint baseline to compare generalisation with."
    out.append({"premise": "the merge generalises better", "holds": holds, "why": why})

    g = diag.get("gain")
    if g and g.get("measured") is not None and len(g.get("weights", [])) > 1:
        meas, pred = g["measured"], g["predicted"]
        holds = meas > 0 and abs(pred - meas) <= th.gain_agreement * abs(meas)
        top = g.get("eigen_split") or []
        share = (sum(top) / pred) if (top and pred) else None
        why = (
            f"measured gain {meas:+.5f} nats, quadratic prediction {pred:+.5f} "
            f"(ratio {pred / meas if meas else float('nan'):.2f}; required within "
            f"{_pct(th.gain_agreement)}). "
            + (
                "The merge gained what the curvature-weighted checkpoint variance predicts."
                if holds
                else "The local quadratic model does not account for the merge's gain."
            )
            + (
                f" The top {len(top)} Hessian directions carry {_pct(share)} of the prediction."
                if share is not None
                else ""
            )
        )
    else:
        holds, why = None, "only one branch: nothing to merge."
    out.append({"premise": "the gain is curvature-weighted variance", "holds": holds, "why": why})
    return out


def overall(items: Iterable[dict]) -> str:
    """One sentence: merge-ready when the basin premises (one basin, flat) hold."""
    by = {v["premise"]: v["holds"] for v in items}
    basin = [by.get("one basin (linear mode connectivity)"), by.get("a flat basin")]
    if all(h is True for h in basin):
        return "θ0 is merge-ready: its branches stay in one flat basin."
    if any(h is False for h in basin):
        return "θ0 is not merge-ready: " + (
            "its branches are separated by a loss barrier."
            if basin[0] is False
            else "its basin is sharp at the scale of the merge."
        )
    return "not enough branches or baselines to decide whether θ0 is merge-ready."


def relative_sigmas(scales: Sequence[float], step: float, dim: int) -> list[float]:
    """σ such that ‖σε‖ ≈ scale × ``step`` for ε ~ N(0, I_dim) (‖ε‖ ≈ √dim)."""
    return [float(s) * step / math.sqrt(dim) for s in scales]


# -- all diagnostics on one run -----------------------------------------------------------------
def diagnose(
    heldout: Objective,
    train: Objective | None,
    base: torch.Tensor,
    branches: Sequence[torch.Tensor],
    weights: Sequence[float],
    merged: torch.Tensor,
    joint: torch.Tensor | None,
    settings,
    progress: bool = False,
) -> dict:
    """Every diagnostic of one run, on ``heldout``'s batches (``train``'s for the train loss).

    ``settings`` is a :class:`merit.config.DiagnosticsConfig`. Returns plain data (JSON-ready):
    ``losses``, ``barriers``, ``distances``, ``generalization``, ``perturbation``, ``gain``,
    ``verdicts``, ``overall``, ``timings`` and the number of loss evaluations and HVPs.
    """
    import time

    timings: dict[str, float] = {}
    k = len(branches)
    names = [f"branch {i}" for i in range(k)]
    alphas = np.linspace(0.0, 1.0, settings.alphas).tolist()
    inner = len(alphas) - 2
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    lines = len(pairs) + 1 + (joint is not None)
    pert_models = 1 + (joint is not None)
    n_scales = sum(1 for s in settings.perturbation_scales if s != 0)
    total = (
        k
        + 2
        + (joint is not None)
        + lines * inner
        + pert_models * n_scales * 2 * settings.perturbation_draws
        + (2 + (joint is not None) if train is not None else 0)
    )
    bar = tqdm(total=total, desc="diagnose: loss evaluations", disable=not progress)

    heldout.on_evaluation = lambda: bar.update(1)
    if train is not None:
        train.on_evaluation = heldout.on_evaluation

    t = time.perf_counter()
    losses = {"θ0": heldout.loss(base), "θ̄": heldout.loss(merged)}
    for name, th in zip(names, branches):
        losses[name] = heldout.loss(th)
    if joint is not None:
        losses["joint"] = heldout.loss(joint)
    timings["losses"] = time.perf_counter() - t

    t = time.perf_counter()
    barriers = []
    for i, j in pairs:
        c = interpolation_curve(
            heldout, branches[i], branches[j], alphas, losses[names[i]], losses[names[j]]
        )
        barriers.append(
            {
                "label": f"{names[i]} – {names[j]}",
                "kind": "branches",
                "a": names[i],
                "b": names[j],
                "ends": [losses[names[i]], losses[names[j]]],
                **c,
            }
        )
    c = interpolation_curve(heldout, base, merged, alphas, losses["θ0"], losses["θ̄"])
    barriers.append(
        {
            "label": "θ0 – θ̄",
            "kind": "base-merged",
            "a": "θ0",
            "b": "θ̄",
            "ends": [losses["θ0"], losses["θ̄"]],
            **c,
        }
    )
    if joint is not None:
        c = interpolation_curve(heldout, base, joint, alphas, losses["θ0"], losses["joint"])
        barriers.append(
            {
                "label": "θ0 – joint",
                "kind": "base-joint",
                "a": "θ0",
                "b": "joint",
                "ends": [losses["θ0"], losses["joint"]],
                **c,
            }
        )
    timings["barriers"] = time.perf_counter() - t

    models = {"merged": merged, **({"joint": joint} if joint is not None else {})}
    dist = distances(base, {**models, **dict(zip(names, branches))})
    dist_rec = {
        "merged": dist["merged"],
        "joint": dist.get("joint"),
        "branches": [dist[n] for n in names],
        "ratio_joint_merged": dist["joint"] / dist["merged"]
        if joint is not None and dist["merged"]
        else None,
        "parameters": heldout.dim,
    }

    t = time.perf_counter()
    gen: dict[str, dict] = {}
    if train is not None:
        for label, theta in (("base", base), ("merged", merged), ("joint", joint)):
            if theta is None:
                continue
            held = {"base": losses["θ0"], "merged": losses["θ̄"], "joint": losses.get("joint")}[
                label
            ]
            gen[label] = {"train": train.loss(theta), "heldout": held}
    timings["generalization"] = time.perf_counter() - t

    t = time.perf_counter()
    step = dist["merged"]
    sigmas = relative_sigmas(settings.perturbation_scales, step, heldout.dim)
    positive = [i for i, s in enumerate(settings.perturbation_scales) if s > 0]
    ref = (
        min(positive, key=lambda i: abs(settings.perturbation_scales[i] - 1.0))
        if positive
        else None
    )
    pert = {
        "scales": list(settings.perturbation_scales),
        "sigmas": sigmas,
        "step": step,
        "reference_index": ref,
        "merged": perturbation_curve(
            heldout, merged, sigmas, settings.perturbation_draws, settings.seed, losses["θ̄"]
        ),
    }
    if joint is not None:
        pert["joint"] = perturbation_curve(
            heldout, joint, sigmas, settings.perturbation_draws, settings.seed, losses["joint"]
        )
    timings["perturbation"] = time.perf_counter() - t
    bar.close()
    heldout.on_evaluation = None
    if train is not None:
        train.on_evaluation = None

    t = time.perf_counter()
    gain = merging_gain(
        heldout,
        base,
        branches,
        weights,
        merged=merged,
        branch_losses=[losses[n] for n in names],
        merged_loss=losses["θ̄"],
        lanczos_iters=settings.lanczos_iters if k > 1 else 0,
        top=settings.top_eigen,
        seed=settings.seed,
        progress=progress,
    )
    timings["gain"] = time.perf_counter() - t
    rec = {
        "parameters": heldout.dim,
        "losses": losses,
        "barriers": barriers,
        "distances": dist_rec,
        "generalization": gen,
        "perturbation": pert,
        "gain": gain.as_dict(),
        "evaluations": heldout.evaluations + (train.evaluations if train else 0),
        "hvps": heldout.hvps,
        "timings": timings,
    }
    th = Thresholds(
        barrier=settings.barrier_tolerance,
        flatness=settings.flatness_tolerance,
        distance_ratio=settings.distance_ratio,
        gain_agreement=settings.gain_agreement,
    )
    rec["verdicts"] = verdicts(rec, th)
    rec["overall"] = overall(rec["verdicts"])
    return rec
