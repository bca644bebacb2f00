"""``plan.json``, typed: the K groups, how they were found and what from (paper §3.2); and the
plan read for people (a summary, every splitter's candidate side by side)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from merit.artifacts import Artifact


@dataclass
class PlanGroup:
    id: int
    datasets: list[str]
    samples: int
    tokens: int  # N_k: the branch's training tokens
    weight: float  # w_k = N_k / Σ N_j (paper eq. 3)


@dataclass
class PlanDataset:
    name: str
    group: int
    samples: int
    tokens: int
    z: list[float]  # conflict embedding (paper §3.2)
    stability: float | None
    grad_sq_norm: float
    calibration_loss: float
    sha256: str


@dataclass
class Plan(Artifact):
    """``plan.json``: the K groups, how they were found, and what they were found from."""

    settings: dict
    base_fingerprint: str
    sketches_sha256: str
    method: str
    objective: str
    rank: int
    K: int
    sketch: dict
    explained_variance: list[float]
    scree: list[float]
    datasets: list[PlanDataset]
    groups: list[PlanGroup]
    stability: dict | None
    candidates: list[dict]
    hessian: dict | None
    warnings: list[str]
    changes: dict | None
    cosine: list[list[float]]
    plots: list[str] = field(default_factory=list)
    version: int = 3
    # A vision-language θ0's parameter groups that every branch trains (null: all of θ0);
    # the exact parameters are the calibration layout's (sketch["layout"]).
    trainable: list[str] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Plan:
        plan = super().from_json(obj)
        plan.datasets = [PlanDataset(**d) for d in obj["datasets"]]
        plan.groups = [PlanGroup(**g) for g in obj["groups"]]
        return plan


def plan_summary(plan: Plan) -> str:
    ev = ", ".join(f"{x:.1%}" for x in plan.explained_variance)
    lines = [
        f"plan: K={plan.K} groups ({plan.method} splitter) from "
        f"r={plan.rank} conflict axes (explained variance {ev})"
    ]
    for g in plan.groups:
        shown = ", ".join(g.datasets[:4]) + (" …" if len(g.datasets) > 4 else "")
        lines.append(
            f"  group {g.id}: {len(g.datasets):>3} datasets, {g.samples:>6} samples, "
            f"{g.tokens:>8} tokens, w={g.weight:.3f}  [{shown}]"
        )
    if st := plan.stability:
        rows = [d for d in plan.datasets if d.stability is not None]
        low = sorted(rows, key=lambda d: d.stability)[:3]
        lines.append(
            f"stability ({st['method']}): resampled plans agree at ARI {st['ari_pairs']:.2f}; "
            "least stable: " + ", ".join(f"{d.name} {d.stability:.0%}" for d in low)
        )
    if ch := plan.changes:
        lines.append(
            f"added: {', '.join(ch['added']) or 'none'}; changed group: "
            f"{', '.join(ch['changed_group']) or 'none'}"
        )
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def plan_comparison(plan: Plan) -> str:
    """Every splitter's plan side by side: predicted gain, merged loss, balance, stability."""
    hs = plan.hessian or {}
    tau = hs.get("horizon")
    head = (
        f"{'splitter':<8} {'gain/τ² (H=I)':>14} {'share':>6} "
        f"{'gain (H)':>10} {'merged loss':>11} {'balance':>8} {'ARI':>5} {'min stab':>8}"
    )
    lines = [f"candidates for K={plan.K} (objective: {plan.objective})", head]
    lines.append("-" * len(head))

    def num(v, fmt):
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return "—".rjust(width) if v is None else format(v, fmt)

    for c in plan.candidates:
        mark = " <- chosen" if c["chosen"] else ""
        if c["groups"] is None:
            lines.append(f"{c['splitter']:<8} n/a: {c['note']}")
            continue
        st = c["stability"] or {}
        lines.append(
            f"{c['splitter']:<8} {num(c['gain'], '14.4g')} {num(c['gain_share'], '6.1%')} "
            f"{num(c['gain_hessian'], '10.4g')} {num(c['merged_loss'], '11.5f')} "
            f"{num(c['balance'], '8.3f')} {num(st.get('ari_pairs'), '5.2f')} "
            f"{num(st.get('dataset_min'), '8.0%')}{mark}"
            + (f"  ({c['note']})" if c["note"] else "")
        )
    if hs and tau is None:
        lines.append(f"no true-H predictions: {hs['note']}")
    elif tau is not None:
        lines.append(
            f"true-H predictions at τ={tau:.4g} ({hs['horizon_from']}): held-out loss at θ0 "
            f"{hs['heldout_loss_theta0']:.5f}, joint training {hs['joint_loss']:.5f}"
        )
    else:
        lines.append(
            "gain (H) and merged loss need planning.hessian=true (under H = I the merged model "
            "θ0 − τḡ does not depend on the split)"
        )
    return "\n".join(lines)
