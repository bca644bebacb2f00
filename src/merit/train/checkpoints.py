"""Sealed checkpoints of a branch: written by the Trainer, sealed by merit, resumed from.

A checkpoint is valid once a small ``merit-checkpoint.json`` marker, written after the Trainer
finished it, records every file's size and sha256, the step, the tokens seen and the run key (θ0,
plan and schedule). A re-run resumes from the newest sealed and intact checkpoint of its own run
key; newer ones that are not are deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from merit.artifacts import sha256_file, write_json

CHECKPOINT_MARKER = "merit-checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(trainer_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoint-N`` directory, newest first."""
    trainer_dir = Path(trainer_dir)
    if not trainer_dir.is_dir():
        return []
    found = []
    for p in trainer_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def seal_checkpoint(ckpt: Path, step: int, tokens_seen: int, run_key: str) -> dict:
    """Write the marker that makes a checkpoint valid: every file's size and sha256.

    Called after the Trainer has finished writing the checkpoint, so a checkpoint without it
    (killed mid-write, or still being uploaded) is never resumed from.
    """
    files = {
        str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != CHECKPOINT_MARKER and not f.name.startswith(".")
    }
    marker = {"step": step, "tokens_seen": tokens_seen, "run_key": run_key, "files": files}
    write_json(ckpt / CHECKPOINT_MARKER, marker)
    return marker


def checkpoint_problem(ckpt: Path, run_key: str) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None if it is complete and intact."""
    mp = ckpt / CHECKPOINT_MARKER
    try:
        marker = json.loads(mp.read_text())
    except FileNotFoundError:
        return "incomplete (no marker)"
    except (OSError, ValueError) as err:
        return f"unreadable marker ({err.__class__.__name__})"
    if marker.get("run_key") != run_key:
        return "from another plan, θ0 or schedule"
    m = _CHECKPOINT_RE.match(ckpt.name)
    if not m or int(m.group(1)) != marker.get("step"):
        return "marker names another step"
    for name, rec in marker.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec["size"]:
            return f"{name} has {f.stat().st_size} bytes, sealed with {rec['size']}"
        if sha256_file(f) != rec["sha256"]:
            return f"{name} differs from its sealed sha256"
    return None


def newest_valid_checkpoint(
    trainer_dir: str | Path, run_key: str
) -> tuple[tuple[Path, dict] | None, list[tuple[Path, str]]]:
    """The newest complete, intact checkpoint (path, marker) and the newer ones passed over."""
    skipped = []
    for _step, ckpt in checkpoint_dirs(trainer_dir):
        problem = checkpoint_problem(ckpt, run_key)
        if problem is None:
            return (ckpt, json.loads((ckpt / CHECKPOINT_MARKER).read_text())), skipped
        skipped.append((ckpt, problem))
    return None, skipped


def resume_point(
    trainer_dir: Path, run_key: str, label: str, say: Callable[[str], None]
) -> tuple[Path | None, int, list[str]]:
    """The newest sealed checkpoint of this job (and the tokens it had seen); unusable newer
    ones are deleted and named."""
    found, skipped = newest_valid_checkpoint(trainer_dir, run_key)
    dropped = []
    for ckpt, why in skipped:
        say(f"{label}: {ckpt.name} is not usable ({why}); falling back to an older one")
        dropped.append(ckpt.name)
        shutil.rmtree(ckpt, ignore_errors=True)
    if found is None:
        return None, 0, dropped
    resume, marker = found
    say(f"{label}: resuming from {resume.name} (step {marker['step']})")
    return resume, int(marker["tokens_seen"]), dropped
