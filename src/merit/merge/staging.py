"""The output directory: staged in a temporary sibling, given θ0's non-weight files, then renamed
into place, so that a crash leaves nothing at the target and a reader never sees half a merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from merit.hashing import CONFIG_FILE
from merit.merge.manifest import CARD_FILE, MANIFEST_FILE

# θ0's files that are weights in some format or training state; everything else (config,
# generation config, tokenizer, chat template, processor configs, ...) is copied to the output.
# θ0's model card describes θ0, not the merge: the output gets its own.
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".pkl", ".h5", ".msgpack")
_STATE_PREFIXES = (
    "optimizer",
    "scheduler",
    "scaler",
    "rng_state",
    "trainer_state",
    "training_args",
)
_NOT_COPIED = {MANIFEST_FILE, CARD_FILE}
_TMP_MARK = ".tmp-"


def make_staging_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of ``out_dir`` named after this process, after removing those
    of earlier merges into ``out_dir`` that were killed mid-merge."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging_dirs(out_dir)
    staging = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` directory to ``out_dir`` (empty or absent)."""
    if out_dir.exists():
        out_dir.rmdir()  # checked empty when planned; rename cannot replace a directory portably
    os.replace(staging, out_dir)


def _remove_stale_staging_dirs(out_dir: Path) -> None:
    """Remove temporary directories of earlier merges into ``out_dir`` whose process is gone
    (killed mid-merge); a live concurrent merge's is left alone."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}{re.escape(_TMP_MARK)}(\d+)-[0-9a-f]+")
    for path in out_dir.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_side_files(
    base_dir: Path, out_dir: Path, dtype: str | None
) -> tuple[dict[Path, str], dict[str, str]]:
    """Copy base's non-weight files (config, tokenizer, templates, processor configs, ...);
    return the sha256s of the files read and of the files written.

    Weights in any format, their indexes, training state, an old manifest and base's model card
    are skipped. With a ``dtype`` override, config.json's dtype entry is updated so that
    ``from_pretrained(dtype="auto")`` loads the weights in the dtype they are stored in.
    """
    read, written = {}, {}
    for src in sorted(base_dir.iterdir()):
        name = src.name
        if (
            not src.is_file()
            or name in _NOT_COPIED
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.startswith(_STATE_PREFIXES)
        ):
            continue
        data = src.read_bytes()
        read[src] = hashlib.sha256(data).hexdigest()
        if name == CONFIG_FILE and dtype is not None:
            config = json.loads(data)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        written[name] = write_bytes(out_dir / name, data)
    return read, written


def write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path``; return its sha256 (hashed from memory, not re-read)."""
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
