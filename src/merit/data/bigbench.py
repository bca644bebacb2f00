"""The BIG-bench mixture: which tasks it holds, and its one-time download from PyPI.

The selection rule (see the shared data README) keeps leaf tasks with at least 250 examples and
short inputs, capped at 1000 examples each; the tasks are written as gzipped task files, one per
dataset, that :mod:`merit.data.formats` reads like any other BIG-bench folder.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import statistics
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from merit.config import ConfigError
from merit.data.formats import DataError, as_text, bigbench_task_files, is_bigbench_task
from merit.fetch import pypi_file

logger = logging.getLogger(__name__)

# Selection rule for the BIG-bench mixture (see /work/shared/data/README.md).
_BB_VERSION = "1.0.0"
_BB_MIN_EXAMPLES = 250
_BB_MAX_MEDIAN_INPUT_CHARS = 600
_BB_MAX_EXAMPLES = 1000
_BB_TASKS_MARKER = "bigbench/benchmark_tasks/"


# --------------------------------------------------------------------------- BIG-bench download


def _task_rel(path: str) -> str:
    """``.../bigbench/benchmark_tasks/arithmetic/2_digit_addition/task.json`` -> ``arithmetic/2_digit_addition``."""
    p = path.replace("\\", "/")
    i = p.find(_BB_TASKS_MARKER)
    if i >= 0:
        p = p[i + len(_BB_TASKS_MARKER) :]
    elif p.startswith("benchmark_tasks/"):
        p = p[len("benchmark_tasks/") :]
    return p.removesuffix("/task.json")


def _leaf_rels(rels: Iterable[str]) -> set[str]:
    """Task dirs with no other task dir below them (a family with subtasks is not a leaf)."""
    rels = set(rels)
    parents = {r.rsplit("/", k)[0] for r in rels for k in range(1, r.count("/") + 1)}
    return rels - parents


def _select_task(rel: str, task: Any) -> dict | None:
    """Apply the size/length rule to one task; cap it at 1000 examples. ``None`` if not selected."""
    if not is_bigbench_task(task):
        return None
    examples = task["examples"]
    if len(examples) < _BB_MIN_EXAMPLES:
        return None
    lengths = [len(as_text(e.get("input", ""))) if isinstance(e, dict) else 0 for e in examples]
    if statistics.median(lengths) > _BB_MAX_MEDIAN_INPUT_CHARS:
        return None
    if len(examples) > _BB_MAX_EXAMPLES:
        # Seeded by the task's path ("family/subtask"): this reproduces the shared files.
        keep = sorted(random.Random(rel).sample(range(len(examples)), _BB_MAX_EXAMPLES))
        task = {**task, "examples": [examples[i] for i in keep]}
    return task


def _output_name(path: str) -> str:
    """File name for a selected task: ``FAMILY__SUBTASK.json.gz`` or ``TASK.json.gz``."""
    return _task_rel(path).replace("/", "__") + ".json.gz"


def select_bigbench_tasks(members: dict[str, dict]) -> dict[str, dict]:
    """Choose the BIG-bench tasks of the mixture, a pure function of the parsed task files.

    Args:
        members: task path (``.../benchmark_tasks/FAMILY[/SUBTASK]/task.json``) -> parsed task.

    Returns:
        The selected paths (sorted) -> task, capped at 1000 examples. A task is selected when
        it is a leaf (no task.json below its directory), has at least 250 examples, and the
        median length of its examples' ``input`` is at most 600 characters. A task with more
        than 1000 examples keeps ``sorted(random.Random("FAMILY/SUBTASK").sample(range(n), 1000))``.
        Input tasks are not modified.
    """
    rel_of = {path: _task_rel(path) for path in members}
    leaves = _leaf_rels(rel_of.values())
    selected: dict[str, dict] = {}
    for path in sorted(members):
        if (
            rel_of[path] in leaves
            and (task := _select_task(rel_of[path], members[path])) is not None
        ):
            selected[path] = task
    return selected


def _download_sdist(cache_dir: Path) -> Path:
    """``cache_dir/bigbench-1.0.0.tar.gz``, verified against PyPI's sha256 (see merit.fetch)."""
    return pypi_file("bigbench", _BB_VERSION, cache_dir, packagetype="sdist")


def _write_task(path: Path, task: dict) -> None:
    # mtime=0 keeps the output byte-for-byte reproducible.
    with path.open("wb") as raw, gzip.GzipFile(path.name, "wb", fileobj=raw, mtime=0) as gz:
        gz.write(json.dumps(task, ensure_ascii=False).encode("utf-8"))


def _extract_bigbench(tarball: Path, dest: Path) -> int:
    """Write the selected tasks of a bigbench sdist into ``dest``; return how many.

    The archive is read in one streaming pass, one task at a time, because the sdist holds
    about 1.7 GB of task JSON: each task is selected, capped and written as soon as it is
    parsed. The leaf rule needs every task path, so non-leaf files are removed at the end.
    """
    written: dict[str, Path] = {}
    rels: set[str] = set()
    with tarfile.open(tarball, "r|gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.endswith("/task.json") and _BB_TASKS_MARKER in name):
                continue
            rel = _task_rel(name)
            if any(part in ("", ".", "..") for part in rel.split("/")):
                continue  # never write outside dest, whatever the archive says
            rels.add(rel)
            fh = tar.extractfile(member)
            if fh is None:
                continue
            try:
                task = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("%s: invalid JSON, skipped", name)
                continue
            if (selected := _select_task(rel, task)) is not None:
                written[rel] = dest / _output_name(rel)
                _write_task(written[rel], selected)
    leaves = _leaf_rels(rels)
    for rel, path in written.items():
        if rel not in leaves:
            path.unlink()
    return len(leaves & written.keys())


def fetch_bigbench(cache_dir: str | Path) -> Path:
    """Return ``cache_dir/bigbench/`` holding the BIG-bench mixture, downloading it if needed.

    If the folder already has task files it is returned as is. Otherwise the ``bigbench==1.0.0``
    sdist is downloaded from PyPI into ``cache_dir`` (sha256-checked; removed afterwards) and
    the tasks chosen by :func:`select_bigbench_tasks` are written as ``FAMILY__SUBTASK.json.gz``
    / ``TASK.json.gz``. The folder appears atomically (written to a temporary directory, then
    renamed), so an interrupted fetch leaves no partial folder behind.

    Raises:
        OSError: PyPI cannot be reached.
        DataError: the download does not match its sha256 or yields no tasks.
    """
    cache_dir = Path(cache_dir)
    dest = cache_dir / "bigbench"
    try:
        return _existing_tasks(dest)
    except DataError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = _download_sdist(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".bigbench-", dir=cache_dir))
    try:
        if _extract_bigbench(tarball, tmp) == 0:
            raise DataError(f"{tarball}: no BIG-bench tasks matched the selection rule")
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process may have finished first; its folder is as good as ours.
            return _existing_tasks(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    tarball.unlink(missing_ok=True)
    return dest


def _existing_tasks(dest: Path) -> Path:
    """``dest`` if it already holds task files, else DataError."""
    bigbench_task_files(dest)
    return dest


SHARED_BIGBENCH = Path("../shared/data/bigbench")


def resolve_bigbench(setting: str | None, cache: Path, progress: bool = True) -> Path | None:
    """The BIG-bench folder: the configured path; for 'auto', $MERIT_BIGBENCH, else
    ../shared/data/bigbench, else the PyPI sdist fetched once into the cache."""
    if setting is None:
        return None
    if setting != "auto":
        p = Path(setting).expanduser()
        if not p.exists():
            raise ConfigError(f"data.bigbench: {p}: no such directory")
        return p
    env = os.environ.get("MERIT_BIGBENCH")
    if env:
        if not Path(env).exists():
            raise ConfigError(f"MERIT_BIGBENCH={env}: no such directory")
        return Path(env)
    if SHARED_BIGBENCH.is_dir():
        return SHARED_BIGBENCH
    try:
        return fetch_bigbench(cache)
    except OSError as err:  # offline, proxy, PyPI down: say what to do instead
        reason = getattr(err, "reason", None) or err.strerror or err
        raise DataError(
            f"data.bigbench=auto: cannot fetch bigbench=={_BB_VERSION} from PyPI ({reason}); "
            "point MERIT_BIGBENCH (or data.bigbench) at a folder of BIG-bench task files"
        ) from None


def family(name: str) -> str:
    """A dataset's family: BIG-bench ``FAMILY__SUBTASK`` files share FAMILY; others stand alone."""
    return name.split("__", 1)[0]
