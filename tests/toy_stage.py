"""A toy stage, in one short module: each plan group's share of the training tokens.

Importing it registers it; the CLI then has a `merit group-shares CONFIG` command that makes the
plan first (and what the plan needs), reusing what is current.
"""

from __future__ import annotations

from dataclasses import dataclass

from merit.artifacts import Artifact
from merit.graph import STAGES, Context, Stage


@dataclass
class GroupShares(Artifact):
    shares: list[float]


def build(ctx: Context, inputs: dict) -> GroupShares:
    tokens = [g.tokens for g in inputs["plan"].groups]
    return GroupShares([t / sum(tokens) for t in tokens])


STAGE = STAGES.register(
    Stage(
        name="group-shares",
        help="each plan group's share of the training tokens",
        reads=("seed", "model", "data", "calibration", "planning"),
        needs=("plan",),
        artifact=GroupShares,
        path=lambda p: p.root / "group_shares.json",
        build=build,
        what="group shares",
        show=lambda _ctx, a: "shares: " + " ".join(f"{s:.4f}" for s in a.shares),
    ),
    replace=True,
)
