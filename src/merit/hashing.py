"""sha256 of the merge's inputs: a stat-keyed cache, and θ0's fingerprint in the same read.

Single files are hashed by :func:`merit.artifacts.sha256_file` (merit's one sha256 of a file);
θ0's weight files are read once for both their own sha256 and merit's fingerprint over all of
them (:func:`fingerprint_and_hashes`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from merit.artifacts import sha256_file, sha256_files, write_json

CONFIG_FILE = "config.json"

# File times tick in jiffies, not nanoseconds: a file changed within this long of being hashed
# could change again without its stat data changing, so its hash is not cached ("racy git").
_RACY_NS = 2 * 10**9


class HashCache:
    """sha256 of files, remembered under a directory by (device, inode, size, mtime, ctime).

    Any write, truncation, rename over or chmod of a file changes its ctime, which no user call
    can set back (git's index relies on the same stat data), so a hit is the hash of the bytes
    on disk; files changed in the last two seconds are not cached, since time stamps are
    coarser than that could tell apart. It spares re-hashing gigabytes of unchanged inputs on
    every merge; verification (:func:`merit.merge.verify.verify_merge`) never uses it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _entry(self, kind: str, path: Path) -> Path:
        key = hashlib.sha256(f"{kind}\0{path.resolve()}".encode()).hexdigest()[:32]
        return self.root / f"{key}.json"

    def get(self, kind: str, paths: Sequence[Path]) -> str | None:
        try:
            rec = json.loads(self._entry(kind, paths[0]).read_text())
            if rec["stat"] == [self.stat(p) for p in paths]:
                return rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def put(self, kind: str, paths: Sequence[Path], stats: list[list[int]], digest: str) -> None:
        """Record ``digest`` if the files still have the stat data they had before hashing."""
        try:
            if [self.stat(p) for p in paths] != stats:
                return
            if time.time_ns() - max(max(st[3], st[4]) for st in stats) < _RACY_NS:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            entry = self._entry(kind, paths[0])
            rec = {"paths": [str(p) for p in paths], "stat": stats, "sha256": digest}
            write_json(entry, rec, indent=None)
        except OSError:
            pass  # a cache that cannot be written is just a cold cache


def _as_cache(cache: HashCache | str | Path | None) -> HashCache | None:
    return cache if cache is None or isinstance(cache, HashCache) else HashCache(cache)


def cached_sha256(path: str | Path, cache: HashCache | str | Path | None) -> str:
    """sha256 of a file, through ``cache`` (a :class:`HashCache` or its directory; ``None``:
    hashed anew)."""
    path, hash_cache = Path(path), _as_cache(cache)
    if hash_cache is None:
        return sha256_file(path)
    hit = hash_cache.get("sha256", [path])
    if hit is None:
        stats = [HashCache.stat(path)]
        hit = sha256_file(path)
        hash_cache.put("sha256", [path], stats, hit)
    return hit


def fingerprint_files(model_dir: Path) -> list[Path]:
    """The files merit's θ0 fingerprint covers (:func:`merit.lm.fingerprint`)."""
    config = model_dir / CONFIG_FILE
    return [*sorted(model_dir.glob("*.safetensors")), *([config] if config.is_file() else [])]


def fingerprint_and_hashes(
    model_dir: Path, cache: HashCache | str | Path | None
) -> tuple[str, dict[Path, str]]:
    """θ0's fingerprint and the sha256 of each file it covers, reading each file once."""
    files, hash_cache = fingerprint_files(model_dir), _as_cache(cache)
    if hash_cache is not None:
        fp = hash_cache.get("fingerprint", files)
        hashes = {f: hash_cache.get("sha256", [f]) for f in files}
        if fp is not None and all(hashes.values()):
            return fp, hashes  # type: ignore[return-value]
    stats = [HashCache.stat(f) for f in files]
    *digests, fp = _digests_and_fingerprint(files)
    hashes = dict(zip(files, digests))
    if hash_cache is not None:
        hash_cache.put("fingerprint", files, stats, fp)
        for f, st, d in zip(files, stats, digests):
            hash_cache.put("sha256", [f], [st], d)
    return fp, hashes


def _digests_and_fingerprint(paths: Sequence[Path]) -> list[str]:
    """sha256 of each file, then merit's fingerprint over all of them (one read of each)."""
    digests, fp = sha256_files(paths)
    return [*digests, fp]
