"""MERIT's overhead: what the method adds to training its branches — calibration, planning and
the merge — as a fraction of branch training time (the paper: 0.8% of wall clock at 7B on a
176-source, 1.6M-sample mixture). Read from the stage times in ``timings.json`` and the
branches' own training seconds (their manifests), so a branch trained on another machine counts
as it ran there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

STEPS = ("calibrate", "plan", "merge")


@dataclass(frozen=True)
class Overhead:
    steps: dict[str, float]  # seconds of each MERIT step
    branches: list[float]  # training seconds of each branch

    @property
    def seconds(self) -> float:
        return sum(self.steps.values())

    @property
    def of_training(self) -> float:
        """Against all branch training: the share of compute when branches run one by one."""
        return self.seconds / sum(self.branches)

    @property
    def of_longest_branch(self) -> float:
        """Against the longest branch: the share of wall clock when branches run in parallel."""
        return self.seconds / max(self.branches)

    def to_json(self) -> dict:
        return {**asdict(self), "seconds": self.seconds, "of_training": self.of_training,
                "of_longest_branch": self.of_longest_branch}  # fmt: skip

    def line(self) -> str:
        parts = " + ".join(f"{k} {v:.0f}s" for k, v in self.steps.items())
        return (
            f"MERIT overhead: {parts} = {self.seconds:.0f}s, {self.of_training:.1%} of branch "
            f"training ({sum(self.branches):.0f}s over {len(self.branches)} branches), "
            f"{self.of_longest_branch:.1%} of the longest branch (the wall clock with branches "
            "in parallel; the paper: 0.8% at 7B)"
        )


def overhead(timings: Mapping[str, object], branch_seconds: Sequence[float]) -> Overhead | None:
    """The overhead, or None before the branches have trained or a step has been timed."""
    steps = {k: float(timings[k]) for k in STEPS if isinstance(timings.get(k), int | float)}
    if len(steps) < len(STEPS) or not branch_seconds or sum(branch_seconds) <= 0:
        return None
    return Overhead(steps, [float(s) for s in branch_seconds])
