"""A plain-words verdict per premise of the paper's argument (§4), and one overall sentence.

Each verdict is ``{"key", "premise", "holds" (True/False/None), "why"}``. ``key`` is stable
(code looks verdicts up by it); ``premise`` and ``why`` are prose for people and may change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

# The premises, in the order they are reported (README, "Is θ0 merge-ready?").
PREMISES: dict[str, str] = {
    "one_basin": "one basin (linear mode connectivity)",
    "near_theta0": "the merge stays near θ0",
    "flat_basin": "a flat basin",
    "generalises": "the merge generalises better",
    "gain_is_variance": "the gain is curvature-weighted variance",
    "targets_curvature": "the split targets high-curvature directions",
}
VERDICT_KEYS: tuple[str, ...] = tuple(PREMISES)


@dataclass(frozen=True)
class Thresholds:
    """When a premise counts as holding; see :class:`merit.config.DiagnosticsConfig`."""

    barrier: float = 0.02  # largest barrier, as a fraction of the endpoints' mean loss
    flatness: float = 0.05  # loss rise at the reference perturbation, as a fraction of the loss
    distance_ratio: float = 1.5  # ‖θ_joint − θ0‖ / ‖θ̄ − θ0‖ at least this
    gain_agreement: float = 0.5  # |predicted − measured| ≤ this × |measured|

    @classmethod
    def from_settings(cls, settings) -> Thresholds:
        """From a :class:`merit.config.DiagnosticsConfig`."""
        return cls(
            barrier=settings.barrier_tolerance,
            flatness=settings.flatness_tolerance,
            distance_ratio=settings.distance_ratio,
            gain_agreement=settings.gain_agreement,
        )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


Judgement = tuple[bool | None, str]


def _one_basin(diag: dict, th: Thresholds) -> Judgement:
    bars = [b for b in diag.get("barriers", []) if b["kind"] == "branches"]
    if not bars:
        return None, "only one branch: there is no pair of branches to connect."

    def rel(b: dict) -> float:
        return b["barrier"] / max(1e-12, float(np.mean(b["ends"])))

    worst = max(bars, key=rel)
    holds = rel(worst) <= th.barrier
    why = (
        f"the largest barrier between two branches ({worst['label']}) is "
        f"{worst['barrier']:+.4f} nats, {_pct(rel(worst))} of the endpoints' loss"
    )
    if holds:
        return holds, why + (
            f" (tolerance {_pct(th.barrier)}): the branches stay in one basin, so averaging "
            "them does not climb a ridge."
        )
    return holds, why + (
        f", above the {_pct(th.barrier)} tolerance: the straight path between "
        "these branches climbs a ridge, so their average leaves the basin."
    )


def _near_theta0(diag: dict, th: Thresholds) -> Judgement:
    dist = diag.get("distances", {})
    merged, joint = dist.get("merged"), dist.get("joint")
    if not (merged and joint):
        return None, "no joint baseline to compare distances with."
    ratio = joint / merged
    holds = ratio >= th.distance_ratio
    return holds, (
        f"θ̄ moved {merged:.3g} from θ0, joint training {joint:.3g}: {ratio:.2f}× farther "
        f"(the paper measures 2.4–2.9×; required ≥ {th.distance_ratio:g}×). "
        + (
            "The merge stays in θ0's neighbourhood, where the local theory applies."
            if holds
            else "The merge is not much closer to θ0 than joint training."
        )
    )


def _rise(curve: dict, ref: int) -> float:
    return (curve["mean"][ref] - curve["loss"]) / max(1e-12, abs(curve["loss"]))


def _flat_basin(diag: dict, th: Thresholds) -> Judgement:
    pert = diag.get("perturbation", {})
    ref = pert.get("reference_index")
    if not pert.get("merged") or ref is None:
        return None, "no perturbation curve."
    rise = _rise(pert["merged"], ref)
    holds = rise <= th.flatness
    extra = f" (the joint model: {_pct(_rise(pert['joint'], ref))})" if pert.get("joint") else ""
    return holds, (
        f"a random step as long as the merge displacement raises θ̄'s loss by {_pct(rise)}"
        f"{extra}; tolerance {_pct(th.flatness)}. "
        + (
            "The basin is flat at the scale of the merge."
            if holds
            else "The basin is sharp at the scale of the merge: small moves cost loss."
        )
    )


def _generalises(diag: dict, th: Thresholds) -> Judgement:
    gen = diag.get("generalization", {})
    if "merged" not in gen or "joint" not in gen:
        return None, "no joint baseline to compare generalisation with."
    m, j = gen["merged"], gen["joint"]
    gm, gj = m["heldout"] - m["train"], j["heldout"] - j["train"]
    holds = gm <= gj
    return holds, (
        f"train → held-out loss: θ̄ {m['train']:.4f} → {m['heldout']:.4f} (gap {gm:+.4f}), "
        f"joint {j['train']:.4f} → {j['heldout']:.4f} (gap {gj:+.4f}). "
        + (
            "The merge generalises at least as well as joint training relative to its fit."
            if holds
            else "The merge has the larger generalisation gap."
        )
    )


def _gain_is_variance(diag: dict, th: Thresholds) -> Judgement:
    g = diag.get("gain")
    if not (g and g.get("measured") is not None and len(g.get("weights", [])) > 1):
        return None, "only one branch: nothing to merge."
    meas, pred = g["measured"], g["predicted"]
    holds = meas > 0 and abs(pred - meas) <= th.gain_agreement * abs(meas)
    top = g.get("eigen_split") or []
    share = (sum(top) / pred) if (top and pred) else None
    return holds, (
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


def _targets_curvature(diag: dict, _th: Thresholds) -> Judgement:
    a = diag.get("alignment")
    if not a:
        return None, (
            "no top Hessian eigenvectors to compare with (diagnostics.lanczos_iters = 0, one "
            "branch, or no calibration sketches)."
        )
    return bool(a["targets_curvature"]), a["line"] + "."


_JUDGES: dict[str, Callable[[dict, Thresholds], Judgement]] = {
    "one_basin": _one_basin,
    "near_theta0": _near_theta0,
    "flat_basin": _flat_basin,
    "generalises": _generalises,
    "gain_is_variance": _gain_is_variance,
    "targets_curvature": _targets_curvature,
}


def verdicts(diag: dict, th: Thresholds = Thresholds()) -> list[dict]:
    """One plain-words verdict per premise, in :data:`VERDICT_KEYS` order:
    ``{"key", "premise", "holds" (True/False/None), "why"}``.

    ``diag`` holds the measurements (keys ``barriers``, ``distances``, ``generalization``,
    ``perturbation``, ``gain``), as :meth:`merit.diagnose.artifact.Diagnostics.to_json` writes.
    """
    out = []
    for key in VERDICT_KEYS:
        holds, why = _JUDGES[key](diag, th)
        out.append({"key": key, "premise": PREMISES[key], "holds": holds, "why": why})
    return out


def overall(items: Iterable[dict]) -> str:
    """One sentence: merge-ready when the basin premises (one basin, flat) hold."""
    by = {v["key"]: v["holds"] for v in items}
    basin, flat = by.get("one_basin"), by.get("flat_basin")
    if basin is True and flat is True:
        return "θ0 is merge-ready: its branches stay in one flat basin."
    if basin is False or flat is False:
        return "θ0 is not merge-ready: " + (
            "its branches are separated by a loss barrier."
            if basin is False
            else "its basin is sharp at the scale of the merge."
        )
    return "not enough branches or baselines to decide whether θ0 is merge-ready."
