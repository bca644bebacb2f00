"""``merge_manifest.json``: what a merge did and the sha256 of every file it read and wrote.

:class:`MergeManifest` is the typed form; its JSON (:meth:`MergeManifest.to_json`) is the file's
content key for key, so manifests written before it existed still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit.artifacts import Artifact, atomic_path
from merit.merge.errors import MergeError

MANIFEST_FILE = "merge_manifest.json"
CARD_FILE = "README.md"
# Where merit records a branch's provenance, next to the branch's ``model/`` directory.
BRANCH_MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "merit-merge/1"


def json_text(obj: Any) -> str:
    """merit's merge JSON: indented, θ̄ and θ0 kept readable (not escaped), one final newline."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


@dataclass
class MergeManifest(Artifact):
    """One merge, as recorded in its output directory.

    ``base_coefficient`` and ``coefficients`` are the file's ``coefficients.base`` and
    ``coefficients.checkpoints``: θ̄ = base_coefficient·θ0 + Σ_k coefficients[k]·θ_k.
    ``inputs`` maps absolute input paths, ``outputs`` output file names, to their sha256.
    ``stamp`` (a run's merge only) is what the stage executor reuses it by.
    """

    method: str
    formula: str
    weights: list[float]
    weights_given: list[float]
    normalized: bool
    weights_from: str
    scale: float | None
    base_coefficient: float
    coefficients: list[float]
    accumulation: str
    dtype: str | None
    output_dtypes: list[str]
    base: str
    base_is_theta0: bool
    base_fingerprint: str | None
    checkpoints: list[str]
    inputs: dict[str, str]
    outputs: dict[str, str]
    num_tensors: int
    total_bytes: int
    metadata: dict[str, Any]
    created_by: str
    format: str = MANIFEST_FORMAT
    params: dict[str, float] = dataclasses.field(default_factory=dict)  # every method parameter

    def to_json(self) -> dict[str, Any]:
        """The content of ``merge_manifest.json``, in its key order."""
        return {
            "format": self.format,
            "method": self.method,
            "formula": self.formula,
            "weights": list(self.weights),
            "weights_given": list(self.weights_given),
            "normalized": self.normalized,
            "weights_from": self.weights_from,
            "scale": self.scale,
            "params": dict(self.params),
            "coefficients": {"base": self.base_coefficient, "checkpoints": list(self.coefficients)},
            "accumulation": self.accumulation,
            "dtype": self.dtype,
            "output_dtypes": list(self.output_dtypes),
            "base": self.base,
            "base_is_theta0": self.base_is_theta0,
            "base_fingerprint": self.base_fingerprint,
            "checkpoints": list(self.checkpoints),
            "inputs": dict(self.inputs),
            "outputs": dict(self.outputs),
            "num_tensors": self.num_tensors,
            "total_bytes": self.total_bytes,
            "metadata": self.metadata,
            "created_by": self.created_by,
        } | ({"stamp": self.stamp} if self.stamp else {})

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MergeManifest:
        """A manifest from the content of ``merge_manifest.json``; keys it does not know are
        ignored. Raises :class:`MergeError` if a key is missing or a value has the wrong kind."""
        try:
            coefficients = obj["coefficients"]
            values = {
                f.name: obj[f.name]
                for f in dataclasses.fields(cls)
                if f.name not in ("base_coefficient", "coefficients", "format", "stamp", "params")
            }
            values |= {
                "base_coefficient": float(coefficients["base"]),
                "coefficients": list(coefficients["checkpoints"]),
                "format": obj.get("format", MANIFEST_FORMAT),
                "stamp": obj.get("stamp") or {},
                "params": dict(obj.get("params") or {}),
            }
            manifest = cls(**values)
            shapes = (manifest.inputs, manifest.outputs, manifest.metadata)
        except (KeyError, TypeError, ValueError) as err:
            raise MergeError(f"merge manifest: missing or malformed {err}") from err
        if not all(isinstance(d, dict) for d in shapes):
            raise MergeError("merge manifest: inputs, outputs and metadata must be objects")
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> MergeManifest:
        """The manifest of the merge in ``directory`` (or the manifest file itself);
        :class:`MergeError` naming the file if it is missing or unreadable."""
        file = Path(directory)
        file = file if file.name == MANIFEST_FILE else file / MANIFEST_FILE
        try:
            return cls.from_json(json.loads(file.read_text()))
        except MergeError as err:
            raise MergeError(f"{file}: {err}") from err
        except (OSError, ValueError) as err:
            raise MergeError(f"{file}: no readable merge manifest ({err})") from err

    def write(self, directory: Path) -> None:
        """Write ``directory/merge_manifest.json`` (atomic with the directory it is staged in)."""
        (directory / MANIFEST_FILE).write_text(json_text(self.to_json()), encoding="utf-8")

    def save(self, path: str | Path) -> None:
        """Rewrite the manifest file ``path`` atomically (the executor adds the stamp)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json_text(self.to_json()), encoding="utf-8")


def recorded_theta0(checkpoint: str | Path) -> tuple[str, Path] | None:
    """θ0's fingerprint as merit recorded it for a checkpoint, and the file recording it.

    merit records it in a merge's ``merge_manifest.json`` and in a branch's ``manifest.json``
    (next to the checkpoint's ``model/`` directory). ``None`` for checkpoints merit did not make.
    """
    path = Path(checkpoint)
    records = (
        path / MANIFEST_FILE,
        path / BRANCH_MANIFEST_FILE,
        path.parent / BRANCH_MANIFEST_FILE,
    )
    for record in records:
        try:
            fp = json.loads(record.read_text()).get("base_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fp, str) and fp:
            return fp, record
    return None
