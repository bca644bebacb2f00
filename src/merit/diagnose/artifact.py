"""``diagnostics/diagnostics.json``: what ``merit diagnose`` measured, typed.

The JSON keys are the ones merit has always written, so older files load. The measurements
stay plain JSON-shaped data (their layout is documented where they are made, in
:mod:`merit.diagnose.measure`); the dataclass names the parts and looks verdicts up by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merit.artifacts import Artifact
from merit.diagnose.verdicts import VERDICT_KEYS

# Held-out losses are stored under these names (kept for files already written).
BASE_LOSS, MERGED_LOSS, JOINT_LOSS = "θ0", "θ̄", "joint"
_UNKEYED = 5  # the premises of files written before verdicts had keys


def branch_name(i: int) -> str:
    """How branch ``i`` is named in losses and barrier endpoints."""
    return f"branch {i}"


@dataclass
class Diagnostics(Artifact):
    parameters: int
    losses: dict[str, float]  # held-out loss by model (BASE_LOSS, MERGED_LOSS, branch_name(i))
    barriers: list[dict]  # interpolation curves; ``kind`` is branches / base-merged / base-joint
    distances: dict  # merged, joint, branches, ratio_joint_merged, parameters
    generalization: dict[str, dict]  # base / merged / joint -> {train, heldout}
    perturbation: dict  # scales, sigmas, step, reference_index, merged, joint
    gain: dict  # merging_gain(...).as_dict()
    verdicts: list[dict] = field(default_factory=list)
    overall: str = ""
    evaluations: int = 0
    hvps: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    alignment: dict = field(default_factory=dict)  # Hessian–PCA alignment, when measured
    # The top Hessian eigenvectors at θ0 (Lanczos), in memory only: the alignment sketches them.
    eigenvectors: object = field(default=None, metadata={"json": False}, repr=False)

    def verdict(self, key: str) -> dict | None:
        """The verdict of premise ``key`` (one of :data:`VERDICT_KEYS`), if judged."""
        return next((v for v in self.verdicts if v.get("key") == key), None)

    @classmethod
    def from_json(cls, obj: dict) -> Diagnostics:
        d = super().from_json(obj)
        # Files written before verdicts had keys list the same five premises in this order.
        if len(d.verdicts) == _UNKEYED and not any("key" in v for v in d.verdicts):
            d.verdicts = [{"key": k, **v} for k, v in zip(VERDICT_KEYS, d.verdicts)]
        return d
