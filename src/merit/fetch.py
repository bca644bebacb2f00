"""Verified downloads of release files from PyPI.

A file is downloaded once into a cache folder and checked against the sha256 that PyPI's JSON API
records for it. The bytes go to a uniquely named ``*.part`` file next to the target and are renamed
into place only after the digest matches, so an interrupted or corrupt download never leaves a
file that looks finished. After a verified download the digest is kept in ``<file>.sha256``; a
later call that finds the file with that digest reuses it without asking PyPI, so a filled cache
works offline.

Only the standard library is used (``urllib``), plus ``tqdm`` for the progress bar.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from merit.artifacts import sha256_file

# Base of PyPI's JSON API. Read at call time, so tests can point it at a local server.
PYPI_JSON_URL = "https://pypi.org/pypi"
TIMEOUT_S = 60
_BLOCK = 1 << 20


class FetchError(OSError):
    """A download failed: PyPI unreachable, no matching file, or a digest mismatch. One-line message."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _get_json(url: str) -> Any:
    """The JSON document at ``url``; HTTPError passes through so the caller can try a fallback."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError:
        raise
    # URLError, timeouts, refused or dropped connections, a garbled response, bad JSON
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot read {url} ({one_line(reason)})") from e


def release_files(project: str, version: str) -> list[dict[str, Any]]:
    """PyPI's records (``filename``, ``url``, ``packagetype``, ``digests``, ``size``) for one release.

    The per-version endpoint is tried first; some mirrors and proxies only serve the per-project
    document, so its ``releases`` entry is the fallback.
    """
    base = PYPI_JSON_URL.rstrip("/")
    errors = []
    for url in (f"{base}/{project}/{version}/json", f"{base}/{project}/json"):
        try:
            meta = _get_json(url)
        except urllib.error.HTTPError as e:
            errors.append(f"{url}: HTTP {e.code}")
            continue
        meta = meta if isinstance(meta, dict) else {}
        files = meta.get("urls") if url.endswith(f"/{version}/json") else None
        files = files or (meta.get("releases") or {}).get(version) or []
        if files:
            return files
        errors.append(f"{url}: no files for version {version}")
    raise FetchError(f"cannot find {project}=={version} on PyPI ({'; '.join(errors)})")


def _pick(files: list[dict], project: str, version: str, packagetype: str, filename: str | None):
    """The one record matching ``packagetype`` (and ``filename`` if given)."""
    matches = [
        f
        for f in files
        if f.get("packagetype") == packagetype
        and (filename is None or f.get("filename") == filename)
    ]
    if len(matches) == 1:
        return matches[0]
    wanted = f"{packagetype} {filename}" if filename else packagetype
    found = ", ".join(f.get("filename", "?") for f in files) or "none"
    how = "no" if not matches else f"{len(matches)} (pass filename=)"
    raise FetchError(f"{how} {wanted} file for {project}=={version} on PyPI (files: {found})")


def _recorded_digest(target: Path) -> str | None:
    try:
        return target.with_name(target.name + ".sha256").read_text().strip() or None
    except OSError:
        return None


def _record_digest(target: Path, sha256: str) -> None:
    target.with_name(target.name + ".sha256").write_text(sha256 + "\n")


def _download(url: str, target: Path, sha256: str, size: int, progress: bool) -> None:
    """Stream ``url`` into ``target``, verified; nothing is left behind on any failure."""
    from tqdm.auto import tqdm

    # A unique .part name keeps two processes fetching the same file from writing into one.
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.part")
    digest = hashlib.sha256()
    try:
        with (
            open(partial, "xb") as out,
            urllib.request.urlopen(url, timeout=TIMEOUT_S) as response,
            tqdm(
                total=size or None,
                unit="B",
                unit_scale=True,
                desc=target.name,
                disable=not progress,
            ) as bar,
        ):
            for block in iter(lambda: response.read(_BLOCK), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
        if digest.hexdigest() != sha256:
            raise FetchError(
                f"{url}: sha256 mismatch (PyPI records {sha256}, got {digest.hexdigest()})"
            )
        os.replace(partial, target)
    except FetchError:
        partial.unlink(missing_ok=True)
        raise
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        partial.unlink(missing_ok=True)
        reason = one_line(getattr(e, "reason", None) or repr(e))
        raise FetchError(f"cannot download {url} ({reason})") from e
    except BaseException:
        partial.unlink(missing_ok=True)  # an interrupted download is useless
        raise


def pypi_file(
    project: str,
    version: str,
    cache_dir: Path,
    *,
    packagetype: str = "sdist",
    filename: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (or reuse) one release file of ``project==version`` into ``cache_dir``.

    The file is checked against the sha256 in PyPI's JSON record and never left partial.
    ``packagetype`` is ``"sdist"`` or ``"bdist_wheel"``; ``filename`` picks one file when several
    match (a release with wheels for several platforms). A file already in ``cache_dir`` is reused
    without network access when its bytes still match the digest recorded when it was downloaded,
    and after a check against PyPI otherwise.

    Raises:
        FetchError: PyPI cannot be reached, has no such file, or the download's digest mismatches.
    """
    cache_dir = Path(cache_dir)
    if filename is not None:
        target = cache_dir / filename
        recorded = _recorded_digest(target)
        if recorded and target.is_file() and sha256_file(target) == recorded:
            return target
    record = _pick(release_files(project, version), project, version, packagetype, filename)
    sha256 = record["digests"]["sha256"]
    target = cache_dir / Path(record["filename"]).name  # never a path PyPI's record chose for us
    if target.is_file() and sha256_file(target) == sha256:
        _record_digest(target, sha256)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _download(record["url"], target, sha256, int(record.get("size") or 0), progress)
    _record_digest(target, sha256)
    return target
