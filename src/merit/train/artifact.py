"""What training leaves: a finished job's ``manifest.json`` and the record of a stage's jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from merit.artifacts import Artifact, sha256_file
from merit.run import RunPaths


@dataclass
class BranchManifest(Artifact):
    """``manifest.json`` of a finished branch or baseline: written last, atomically."""

    label: str
    group: int | None
    plan_sha256: str
    base_fingerprint: str
    training: str  # settings hash of the training stage
    datasets: list[str]
    examples: int
    tokens: int
    tokens_seen: int
    tokens_scheduled: int
    epochs: float
    answer_tokens: int
    steps: int
    lora: bool
    resumed_from_step: int | None
    final_loss: float | None
    loss_summary: dict
    losses: list
    seconds: float
    weights: dict[str, str]  # path relative to the job directory -> sha256
    # What trained: the parameter groups (null: all of θ0) and the sha256 of the trainable
    # parameters' names and shapes, which must be the plan's calibration layout.
    trainable: list[str] | None = None
    layout: str = ""

    def matches(self, p_hash: str, base_fp: str, training: str) -> bool:
        return (self.plan_sha256, self.base_fingerprint, self.training) == (
            p_hash,
            base_fp,
            training,
        )


@dataclass
class Trained(Artifact):
    """``branches/trained.json`` (or ``baselines/joint/trained.json``): the finished jobs, by
    their manifests' sha256, and the tokens each saw."""

    manifests: dict[str, str]  # job directory (relative to the run) -> manifest sha256
    tokens_seen: dict[str, int] = field(default_factory=dict)

    def intact(self, paths: RunPaths) -> bool:
        """Whether every job's manifest is still the one recorded."""
        root = paths.root
        return all(
            (f := RunPaths.manifest(root / rel)).is_file() and sha256_file(f) == digest
            for rel, digest in self.manifests.items()
        )
