"""The run directory: where each stage reads its inputs and writes its artifacts.

Artifacts are data: JSON files that the next stage reads and verifies, written atomically so a
crash never leaves half a file that a later stage could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: writers never clash
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
