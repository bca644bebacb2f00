"""Artifacts: what one stage writes and the next reads and verifies.

Each is typed data (an :class:`Artifact` dataclass) stored as JSON, written atomically so a crash
never leaves half a file that a later stage could mistake for a finished one; files are identified
by their sha256.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed over ``path`` when the block ends
    well, removed when it fails, so a reader sees the old file or the new one, never half of it.
    The name is per process and thread: concurrent writers never clash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: dict, indent: int | None = 2) -> None:
    """Write JSON atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (see :func:`sha256_files`)."""
    return sha256_files([Path(path)])[0][0]


def sha256_files(paths: Sequence[Path]) -> tuple[list[str], str]:
    """The sha256 of each file, and merit's fingerprint of them all (sha256 over each file's name
    then bytes, in turn: θ0's fingerprint), reading each file once, in 4 MiB blocks from a memory
    map: no copy into a read buffer, which is measurably faster when the merge hashes several GB
    on parallel threads."""
    combined = hashlib.sha256()
    digests = []
    for path in paths:
        h = hashlib.sha256()
        combined.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    view = memoryview(m)
                    try:
                        for start in range(0, size, 1 << 22):
                            block = view[start : start + (1 << 22)]
                            h.update(block)
                            combined.update(block)
                            block.release()
                    finally:
                        view.release()
        digests.append(h.hexdigest())
    return digests, combined.hexdigest()


@dataclass
class Artifact:
    """A stage's output as typed data: ``to_json`` is exactly what is written, ``from_json`` reads
    it back (keys it does not know are ignored, so older merit versions' extra keys are harmless;
    missing ones take the field's default). Fields with ``metadata={"json": False}`` are
    in-memory only (tensors, say). ``stamp`` is what the executor (:mod:`merit.graph`) reuses it
    by: the stage's version, settings, θ0 and inputs it was made from."""

    stamp: dict = field(default_factory=dict, kw_only=True)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("json", True)}

    @classmethod
    def from_json(cls: type[A], obj: dict) -> A:
        known = {f.name for f in fields(cls) if f.init and f.metadata.get("json", True)}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls: type[A], path: str | Path) -> A:
        return cls.from_json(read_json(path))

    @classmethod
    def load_if(cls: type[A], path: str | Path) -> A | None:
        """The artifact at ``path``, or None where there is none yet."""
        return cls.load(path) if Path(path).is_file() else None


A = TypeVar("A", bound=Artifact)
