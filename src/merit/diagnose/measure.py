"""Every diagnostic of one run, on one fixed set of held-out batches (paper §4).

Loss along straight lines and barriers, distances to θ0, train vs held-out loss, flatness under
Gaussian perturbations and the merging gain against its quadratic prediction, then a verdict per
premise. The measurements are the functions of :mod:`merit.diagnose.premises`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.diagnose.artifact import (
    BASE_LOSS,
    JOINT_LOSS,
    MERGED_LOSS,
    Diagnostics,
    branch_name,
)
from merit.diagnose.premises import (
    Objective,
    distances,
    interpolation_curve,
    merging_gain,
    perturbation_curve,
    relative_sigmas,
)
from merit.diagnose.verdicts import Thresholds, overall, verdicts


def _loss_evaluations(k: int, joint: bool, train: bool, settings) -> int:
    """How many loss evaluations :func:`measure` makes before the gain (for the progress bar)."""
    inner = settings.alphas - 2
    lines = k * (k - 1) // 2 + 1 + joint
    n_scales = sum(1 for s in settings.perturbation_scales if s != 0)
    perturbed = (1 + joint) * n_scales * 2 * settings.perturbation_draws
    return k + 2 + joint + lines * inner + perturbed + ((2 + joint) if train else 0)


def _barrier(
    obj: Objective, ends: dict[str, torch.Tensor], losses: dict, a: str, b: str, kind, alphas
) -> dict:
    c = interpolation_curve(obj, ends[a], ends[b], alphas, losses[a], losses[b])
    return {
        "label": f"{a} – {b}",
        "kind": kind,
        "a": a,
        "b": b,
        "ends": [losses[a], losses[b]],
        **c,
    }


def _barriers(obj: Objective, ends: dict[str, torch.Tensor], losses: dict, k: int, alphas):
    """Every pair of branches, θ0 → θ̄ and (when trained) θ0 → joint."""
    names = [branch_name(i) for i in range(k)]
    out = [
        _barrier(obj, ends, losses, names[i], names[j], "branches", alphas)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    out.append(_barrier(obj, ends, losses, BASE_LOSS, MERGED_LOSS, "base-merged", alphas))
    if JOINT_LOSS in ends:
        out.append(_barrier(obj, ends, losses, BASE_LOSS, JOINT_LOSS, "base-joint", alphas))
    return out


def _distances(obj: Objective, ends: dict[str, torch.Tensor], k: int) -> dict:
    models = {
        "merged": ends[MERGED_LOSS],
        **{branch_name(i): ends[branch_name(i)] for i in range(k)},
    }
    if JOINT_LOSS in ends:
        models["joint"] = ends[JOINT_LOSS]
    dist = distances(ends[BASE_LOSS], models)
    joint = dist.get("joint")
    return {
        "merged": dist["merged"],
        "joint": joint,
        "branches": [dist[branch_name(i)] for i in range(k)],
        "ratio_joint_merged": joint / dist["merged"]
        if joint is not None and dist["merged"]
        else None,
        "parameters": obj.dim,
    }


def _generalization(train: Objective | None, ends: dict[str, torch.Tensor], losses: dict):
    """Train vs held-out loss of θ0, θ̄ and joint (keys base / merged / joint)."""
    if train is None:
        return {}
    out = {}
    for key, name in (("base", BASE_LOSS), ("merged", MERGED_LOSS), ("joint", JOINT_LOSS)):
        if name in ends:
            out[key] = {"train": train.loss(ends[name]), "heldout": losses[name]}
    return out


def _perturbation(obj: Objective, ends: dict, losses: dict, step: float, settings) -> dict:
    """Flatness of θ̄ (and joint) at perturbation norms that are multiples of ‖θ̄ − θ0‖."""
    scales = list(settings.perturbation_scales)
    sigmas = relative_sigmas(scales, step, obj.dim)
    positive = [i for i, s in enumerate(scales) if s > 0]
    # The verdict reads the rise at the scale closest to 1 (a step as long as the merge's).
    ref = min(positive, key=lambda i: abs(scales[i] - 1.0)) if positive else None
    out = {"scales": scales, "sigmas": sigmas, "step": step, "reference_index": ref}
    for key, name in (("merged", MERGED_LOSS), ("joint", JOINT_LOSS)):
        if name in ends:
            out[key] = perturbation_curve(
                obj, ends[name], sigmas, settings.perturbation_draws, settings.seed, losses[name]
            )
    return out


def _measure_losses(heldout, train, ends, k, settings, progress, timings) -> dict:
    """Everything but the gain: loss evaluations only, under one progress bar."""
    total = _loss_evaluations(k, JOINT_LOSS in ends, train is not None, settings)
    bar = tqdm(total=total, desc="diagnose: loss evaluations", disable=not progress)
    objectives = [o for o in (heldout, train) if o is not None]
    for o in objectives:
        o.on_evaluation = lambda: bar.update(1)
    try:
        alphas = np.linspace(0.0, 1.0, settings.alphas).tolist()
        t = time.perf_counter()
        losses = {name: heldout.loss(theta) for name, theta in ends.items()}
        timings["losses"] = time.perf_counter() - t
        t = time.perf_counter()
        barriers = _barriers(heldout, ends, losses, k, alphas)
        timings["barriers"] = time.perf_counter() - t
        dist = _distances(heldout, ends, k)
        t = time.perf_counter()
        gen = _generalization(train, ends, losses)
        timings["generalization"] = time.perf_counter() - t
        t = time.perf_counter()
        pert = _perturbation(heldout, ends, losses, dist["merged"], settings)
        timings["perturbation"] = time.perf_counter() - t
    finally:
        bar.close()
        for o in objectives:
            o.on_evaluation = None
    return {
        "losses": losses,
        "barriers": barriers,
        "distances": dist,
        "generalization": gen,
        "perturbation": pert,
    }


def measure(
    heldout: Objective,
    train: Objective | None,
    base: torch.Tensor,
    branches: Sequence[torch.Tensor],
    weights: Sequence[float],
    merged: torch.Tensor,
    joint: torch.Tensor | None,
    settings,
    progress: bool = False,
) -> Diagnostics:
    """Every diagnostic of one run, on ``heldout``'s batches (``train``'s for the train loss),
    with a verdict per premise. ``settings`` is a :class:`merit.config.DiagnosticsConfig`."""
    k = len(branches)
    ends = {BASE_LOSS: base, MERGED_LOSS: merged}
    ends.update({branch_name(i): th for i, th in enumerate(branches)})
    if joint is not None:
        ends[JOINT_LOSS] = joint
    timings: dict[str, float] = {}
    parts = _measure_losses(heldout, train, ends, k, settings, progress, timings)
    t = time.perf_counter()
    gain = merging_gain(
        heldout,
        base,
        branches,
        weights,
        merged=merged,
        branch_losses=[parts["losses"][branch_name(i)] for i in range(k)],
        merged_loss=parts["losses"][MERGED_LOSS],
        lanczos_iters=settings.lanczos_iters if k > 1 else 0,
        top=settings.top_eigen,
        seed=settings.seed,
        progress=progress,
    )
    timings["gain"] = time.perf_counter() - t
    diag = Diagnostics(
        parameters=heldout.dim,
        gain=gain.as_dict(),
        evaluations=heldout.evaluations + (train.evaluations if train else 0),
        hvps=heldout.hvps,
        timings=timings,
        **parts,
    )
    diag.eigenvectors = gain.vectors
    diag.verdicts = verdicts(diag.to_json(), Thresholds.from_settings(settings))
    diag.overall = overall(diag.verdicts)
    return diag
