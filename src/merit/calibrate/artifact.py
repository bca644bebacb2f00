"""``calibration/calibration.json``, typed: what the sketches beside it are of (paper §3.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from merit.artifacts import Artifact


@dataclass
class CalibrationRecord(Artifact):
    """``calibration/calibration.json``: what the sketches in ``sketches.safetensors`` are of."""

    settings: dict
    base_fingerprint: str
    spec: dict
    sketches_sha256: str
    datasets: list[str]
    computed: list[str]
    sq_norms: list[float]
    sq_norm_exact: list[bool]
    losses: list[float]
    answer_tokens: list[int]
    part_tokens: list[list[int]]
    data_ids: dict[str, str]
    modes: list[str] = field(default_factory=list)  # per computed dataset: stream / accumulate
    # The tensors (sketches, parts, gram, part_gram), loaded with the record.
    tensors: dict = field(default_factory=dict, metadata={"json": False}, repr=False)
