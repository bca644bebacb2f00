"""Streaming, bounded-memory weighted merge of Hugging Face checkpoints, with proof.

MERIT fine-tunes K branches independently from a base model θ0 and merges them once
(paper eq. 3: θ̄ = Σ_k w_k θ_k, with w_k = N_k / Σ_j N_j computed by the caller).
:func:`merge_checkpoints` applies that sum (or its task-vector form θ0 + s·Σ_k w_k (θ_k − θ0))
chunk by chunk straight from the checkpoints' memory-mapped safetensors files, so memory stays a
few cache-sized buffers whatever K and the model size, and writes a Hugging Face model directory
(weights, θ0's config/tokenizer/processor files, a model card and ``merge_manifest.json`` with
the sha256 of every input and output file) atomically. :func:`verify_merge` re-checks it.

Only torch is imported: no transformers, no datasets, no safetensors (the format is a JSON
header and raw little-endian bytes; reading it directly lets the merge read tensors in place).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import re
import secrets
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "merge_manifest.json"
CARD_FILE = "README.md"
MANIFEST_FORMAT = "merit-merge/1"
METHODS = ("linear", "task_vector")

# safetensors header dtype names <-> torch dtypes (the on-disk format is little-endian).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

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

_MAX_PROBLEM_LINES = 50
_MAX_HEADER_BYTES = 100 * 1024**2
_HASH_CHUNK = 4 * 1024**2
# Elements per work item. The fp32 accumulator and scratch of one chunk (2 MiB) stay in L2, so
# each input element crosses memory once (as bf16) instead of three times as fp32: several times
# faster than whole-tensor arithmetic, and memory no longer grows with the largest tensor.
_CHUNK = 1 << 18
# A base coefficient 1 − s·Σw this small is rounding noise in decimal weights (0.4 + 0.3 + 0.2
# + 0.1 ≠ 1 in binary): dropping it makes the task-vector form with s = 1 and Σw = 1 bitwise the
# linear merge, as it is mathematically.
_ZERO_COEFFICIENT = 1e-12
_TMP_MARK = ".tmp-"
# File times tick in jiffies, not nanoseconds: a file changed within this long of being hashed
# could change again without its stat data changing, so its hash is not cached ("racy git").
_RACY_NS = 2 * 10**9


class MergeError(ValueError):
    """One-line message naming the tensor or file at fault.

    When validation finds several problems they are reported together, one line each.
    """


@dataclass(frozen=True)
class _Spec:
    """Where a tensor lives: its file, safetensors dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# -- reading checkpoints ------------------------------------------------------------------------
def read_safetensors_header(file: str | Path) -> dict[str, _Spec]:
    """Parse a safetensors file's header: name -> dtype, shape and byte range, in file order.

    Raises :class:`MergeError` (naming the file) if it is not a well-formed safetensors file.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise MergeError(f"{file}: unreadable safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise MergeError(f"{file}: unreadable safetensors file (header is not a JSON object)")
    data_start = 8 + length
    specs: dict[str, _Spec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise MergeError(f"{file}: malformed header entry for tensor {name!r}") from err
        if dtype not in _SAFETENSORS_DTYPES:
            raise MergeError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0:
            raise MergeError(f"{file}: tensor {name!r} has inconsistent offsets for its shape")
        if data_start + end > size:
            raise MergeError(f"{file}: tensor {name!r} lies beyond the end of the file")
        specs[name] = _Spec(file, dtype, shape, data_start + begin, data_start + end)
    return specs


def checkpoint_tensors(path: str | Path) -> dict[str, Path]:
    """Map each tensor name of a Hugging Face checkpoint directory to the file holding it.

    Reads the ``weight_map`` of ``model.safetensors.index.json`` for sharded checkpoints,
    otherwise the header of ``model.safetensors``. Order is the index's (or the file's). Raises
    :class:`MergeError` if the directory has neither, the index is malformed or names a shard
    that does not exist.
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MergeError(f"{index}: unreadable safetensors index ({err})") from err
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise MergeError(f"{index}: weight_map is not a mapping of tensor name to file name")
        files = {name: path / file for name, file in weight_map.items()}
        for file in dict.fromkeys(files.values()):
            if not file.is_file():
                raise MergeError(f"{file}: shard listed in {index} does not exist")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(read_safetensors_header(single), single)
    if not path.is_dir():
        raise MergeError(f"{path}: no such checkpoint directory")
    raise MergeError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are supported)")


def _read_specs(path: Path) -> tuple[dict[str, _Spec], list[str]]:
    """Every tensor's spec from the checkpoint's safetensors headers; problems, not raises, so
    that all checkpoints can be reported at once."""
    try:
        files = checkpoint_tensors(path)
        headers = {file: read_safetensors_header(file) for file in dict.fromkeys(files.values())}
    except MergeError as err:
        return {}, [str(err)]
    specs, problems = {}, []
    for name, file in files.items():
        spec = headers[file].get(name)
        if spec is None:
            problems.append(f"{file}: tensor {name!r} listed in the index is not in the file")
        else:
            specs[name] = spec
    return specs, problems


class _Mapped:
    """Read-only memory maps of input files; tensors are views of the page cache, not copies."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:
            m = self._maps.get(file)
            if m is None:
                with file.open("rb") as f:
                    # Copy-on-write is never triggered (nothing writes), but it gives torch a
                    # writable buffer, which frombuffer wants; the pages stay file-backed.
                    m = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return m

    def tensor(self, spec: _Spec) -> torch.Tensor:
        """The flat tensor in place (no copy)."""
        dtype = _SAFETENSORS_DTYPES[spec.dtype]
        if spec.numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(
            self._map(spec.file), dtype=dtype, offset=spec.start, count=spec.numel
        )

    def raw(self, spec: _Spec) -> memoryview:
        return memoryview(self._map(spec.file))[spec.start : spec.end]

    def release(self) -> None:
        # Unmapping is left to the garbage collector: an explicit close() raises while a view
        # is alive (e.g. in an exception's traceback).
        self._maps.clear()


def recorded_theta0(checkpoint: str | Path) -> tuple[str, Path] | None:
    """θ0's fingerprint as merit recorded it for a checkpoint, and the file recording it.

    merit records it in a merge's ``merge_manifest.json`` and in a branch's ``manifest.json``
    (next to the checkpoint's ``model/`` directory). ``None`` for checkpoints merit did not make.
    """
    path = Path(checkpoint)
    for record in (path / MANIFEST_FILE, path / "manifest.json", path.parent / "manifest.json"):
        try:
            fp = json.loads(record.read_text()).get("base_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fp, str) and fp:
            return fp, record
    return None


# -- validation ---------------------------------------------------------------------------------
def _header_problems(
    base_dir: Path, base_specs: dict[str, _Spec], branch_dir: Path, specs: dict[str, _Spec]
) -> list[str]:
    """One line per tensor of a branch whose name, shape or dtype disagrees with θ0."""
    problems = [
        f"{branch_dir}: missing tensor {name!r} (present in base {base_dir})"
        for name in base_specs
        if name not in specs
    ]
    for name, spec in specs.items():
        want = base_specs.get(name)
        if want is None:
            problems.append(f"{spec.file}: extra tensor {name!r} (not in base {base_dir})")
        elif spec.shape != want.shape:
            problems.append(
                f"{spec.file}: tensor {name!r} has shape {list(spec.shape)}, base has {list(want.shape)}"
            )
        elif spec.dtype != want.dtype:
            problems.append(
                f"{spec.file}: tensor {name!r} has dtype {spec.dtype}, base has {want.dtype}"
            )
    return problems


def _non_floating_problems(
    base_specs: dict[str, _Spec], branch_specs: list[dict[str, _Spec]], mapped: _Mapped
) -> list[str]:
    """Integer/bool buffers cannot be averaged: θ0's is kept, so every branch must equal it."""
    problems = []
    for name, spec in base_specs.items():
        if _SAFETENSORS_DTYPES[spec.dtype].is_floating_point:
            continue
        expected = mapped.raw(spec)
        for specs in branch_specs:
            if mapped.raw(specs[name]) != expected:
                problems.append(
                    f"{specs[name].file}: non-floating tensor {name!r} differs from base {spec.file}"
                )
    return problems


def _provenance_problems(
    base_dir: Path, theta0: str | None, branch_dirs: list[Path]
) -> tuple[list[str], str | None]:
    """Checkpoints that merit recorded as trained from another θ0 than the others (or the base).

    Returns the problems and θ0's fingerprint as far as it is known.
    """
    problems = []
    first: tuple[str, Path] | None = None
    for branch_dir in branch_dirs:
        rec = recorded_theta0(branch_dir)
        if rec is None:
            continue
        fp, record = rec
        if theta0 is not None and fp != theta0:
            problems.append(
                f"{record}: {branch_dir} was trained from another θ0 "
                f"(fingerprint {fp[:12]}…, base {base_dir} is {theta0[:12]}…)"
            )
        elif theta0 is None and first is not None and fp != first[0]:
            problems.append(
                f"{record}: {branch_dir} was trained from another θ0 "
                f"(fingerprint {fp[:12]}…, {first[1]} records {first[0][:12]}…)"
            )
        first = first or rec
    return problems, theta0 if theta0 is not None else (first[0] if first else None)


def _problems_error(out_dir: Path, problems: list[str]) -> MergeError:
    """One problem: one line. Several: a summary line, then one line each."""
    if len(problems) == 1:
        return MergeError(f"cannot merge into {out_dir}: {problems[0]}")
    lines = problems[:_MAX_PROBLEM_LINES]
    if len(problems) > _MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - _MAX_PROBLEM_LINES} more")
    return MergeError("\n".join([f"cannot merge into {out_dir}: {len(problems)} problems", *lines]))


# -- hashing ------------------------------------------------------------------------------------
class HashCache:
    """sha256 of files, remembered under a directory by (device, inode, size, mtime, ctime).

    Any write, truncation, rename over or chmod of a file changes its ctime, which no user call
    can set back (git's index relies on the same stat data), so a hit is the hash of the bytes
    on disk; files changed in the last two seconds are not cached, since time stamps are
    coarser than that could tell apart. It spares re-hashing gigabytes of unchanged inputs on
    every merge; verification (:func:`verify_merge`) never uses it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _entry(self, kind: str, path: Path) -> Path:
        key = hashlib.sha256(f"{kind}\0{path.resolve()}".encode()).hexdigest()[:32]
        return self.root / f"{key}.json"

    def get(self, kind: str, paths: Sequence[Path]) -> str | None:
        try:
            rec = json.loads(self._entry(kind, paths[0]).read_text())
            if rec["stat"] == [self._stat(p) for p in paths]:
                return rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def put(self, kind: str, paths: Sequence[Path], stats: list[list[int]], digest: str) -> None:
        """Record ``digest`` if the files still have the stat data they had before hashing."""
        try:
            if [self._stat(p) for p in paths] != stats:
                return
            if time.time_ns() - max(max(st[3], st[4]) for st in stats) < _RACY_NS:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            entry = self._entry(kind, paths[0])
            tmp = entry.with_name(f".{entry.name}.{secrets.token_hex(4)}")
            rec = {"paths": [str(p) for p in paths], "stat": stats, "sha256": digest}
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, entry)
        except OSError:
            pass  # a cache that cannot be written is just a cold cache


def _hash_files(paths: Sequence[Path], names: Sequence[bytes | None] = ()) -> list[str]:
    """sha256 of each file, plus (when ``names`` is given) merit's fingerprint over all of them:
    sha256 of name + bytes for each file in turn, as :func:`merit.lm.fingerprint` defines
    it. Each file is read once for both, from a memory map (no copy into a read buffer)."""
    combined = hashlib.sha256() if names else None
    digests = []
    for i, path in enumerate(paths):
        digest = hashlib.sha256()
        if combined is not None:
            combined.update(names[i] or path.name.encode())
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    view = memoryview(m)
                    try:
                        for start in range(0, size, _HASH_CHUNK):
                            chunk = view[start : start + _HASH_CHUNK]
                            digest.update(chunk)
                            if combined is not None:
                                combined.update(chunk)
                            chunk.release()
                    finally:
                        view.release()
        digests.append(digest.hexdigest())
    if combined is not None:
        digests.append(combined.hexdigest())
    return digests


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    return _hash_files([Path(path)])[0]


def _cached_sha256(path: Path, cache: HashCache | None) -> str:
    if cache is None:
        return sha256_file(path)
    hit = cache.get("sha256", [path])
    if hit is None:
        stats = [HashCache._stat(path)]
        hit = sha256_file(path)
        cache.put("sha256", [path], stats, hit)
    return hit


def cached_sha256(path: str | Path, cache_dir: str | Path | None) -> str:
    """sha256 of a file, through the :class:`HashCache` at ``cache_dir`` (``None``: none)."""
    return _cached_sha256(Path(path), HashCache(cache_dir) if cache_dir is not None else None)


def fingerprint_files(model_dir: Path) -> list[Path]:
    """The files merit's θ0 fingerprint covers (:func:`merit.lm.fingerprint`)."""
    config = model_dir / "config.json"
    return [*sorted(model_dir.glob("*.safetensors")), *([config] if config.is_file() else [])]


def _fingerprint_and_hashes(
    model_dir: Path, cache: HashCache | None
) -> tuple[str, dict[Path, str]]:
    """θ0's fingerprint and the sha256 of each file it covers, reading each file once."""
    files = fingerprint_files(model_dir)
    if cache is not None:
        fp = cache.get("fingerprint", files)
        hashes = {f: cache.get("sha256", [f]) for f in files}
        if fp is not None and all(hashes.values()):
            return fp, hashes  # type: ignore[return-value]
    stats = [HashCache._stat(f) for f in files]
    *digests, fp = _hash_files(files, [f.name.encode() for f in files])
    hashes = dict(zip(files, digests))
    if cache is not None:
        cache.put("fingerprint", files, stats, fp)
        for f, st, d in zip(files, stats, digests):
            cache.put("sha256", [f], [st], d)
    return fp, hashes


# -- the merge ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """What is summed: θ̄ = c0·θ0 + Σ_k c_k θ_k (c0 = 0 for the linear merge)."""

    method: str
    weights_given: tuple[float, ...]
    weights: tuple[float, ...]
    normalized: bool
    scale: float | None
    base_coefficient: float
    coefficients: tuple[float, ...]

    @property
    def formula(self) -> str:
        if self.method == "linear":
            return "θ̄ = Σ_k w_k θ_k"
        return "θ̄ = θ0 + s·Σ_k w_k (θ_k − θ0)"


def plan_merge(
    weights: Sequence[float],
    *,
    method: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
) -> MergePlan:
    """Turn weights into the coefficients each checkpoint (and θ0) is multiplied by.

    ``normalize`` divides the weights by their sum first. The task-vector form
    θ0 + s·Σ w_k (θ_k − θ0) is summed as (1 − s·Σw)·θ0 + Σ (s·w_k)·θ_k: with s = 1 and weights
    summing to one the θ0 term vanishes and it is bitwise the linear merge.
    """
    given = tuple(float(w) for w in weights)
    if not given:
        raise MergeError("no checkpoints to merge")
    if method not in METHODS:
        raise MergeError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if not all(math.isfinite(w) for w in given):
        raise MergeError(f"weights must be finite, got {list(given)}")
    if not math.isfinite(scale):
        raise MergeError(f"scale must be finite, got {scale}")
    total = math.fsum(given)
    if normalize:
        if total == 0:
            raise MergeError(f"cannot normalise weights that sum to 0: {list(given)}")
        used = tuple(w / total for w in given)
    else:
        used = given
    if method == "linear":
        return MergePlan(method, given, used, normalize, None, 0.0, used)
    coefficients = tuple(scale * w for w in used)
    c0 = math.fsum([1.0, *(-c for c in coefficients)])
    if abs(c0) <= _ZERO_COEFFICIENT:
        c0 = 0.0
    return MergePlan(method, given, used, normalize, float(scale), c0, coefficients)


def merge_checkpoints(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    *,
    method: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
    weights_from: str = "explicit",
    base_is_theta0: bool = True,
    base_fingerprint: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
    hash_cache: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the merge of ``checkpoints`` to ``out`` as a Hugging Face model directory.

    ``method="linear"``: θ̄ = Σ_k w_k θ_k (paper eq. 3). ``method="task_vector"``:
    θ̄ = θ0 + s·Σ_k w_k (θ_k − θ0) with θ0 = ``base`` and s = ``scale``. Floating tensors are
    accumulated in fp32 (fp64 when an input or the output is fp32) and rounded once; the
    arithmetic is mergekit's (fused multiply-add per checkpoint, in order), so a linear merge
    of 8/16-bit checkpoints equals mergekit's bit for bit.

    Args:
        base: a model directory fixing the output's tensor names, order, shapes and default
            dtypes (a tied ``lm_head`` stays absent, so stays tied) and supplying the non-weight
            files (config, generation config, tokenizer, chat template, processor files)
            copied to ``out``. Its floating values are used only by the task-vector form.
        checkpoints: model directories (safetensors, single or sharded) with exactly base's
            tensors, shapes and dtypes.
        weights: one per checkpoint; used as given unless ``normalize``.
        out: output directory; must not exist or be empty. Written to a temporary sibling
            directory renamed into place, so a crash leaves nothing at ``out``.
        method, scale, normalize: see :func:`plan_merge`.
        weights_from: where the weights come from, recorded in the manifest and model card.
        base_is_theta0: whether ``base`` is the θ0 the checkpoints were trained from (else it
            only supplies structure and files). Checkpoints merit recorded as trained from
            another θ0 are refused.
        base_fingerprint: θ0's fingerprint if already known; computed otherwise.
        dtype: output dtype of floating tensors ("bfloat16", "float16" or "float32");
            ``None`` keeps base's per tensor. When given, config.json's dtype is updated.
        max_shard_bytes: largest tensor data per output file; beyond it the output is sharded
            as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
        metadata: extra JSON-able information recorded under "metadata" in the manifest.
        hash_cache: directory of a :class:`HashCache` for input hashes; ``None`` hashes anew.
        threads: worker threads for the arithmetic (default: the CPUs available, minus one
            for writing and hashing).
        progress: show a progress bar.

    Returns:
        The manifest, also written to ``out/merge_manifest.json``.

    Raises:
        MergeError: before anything is written, listing every problem found (missing/extra
            tensors, shape or dtype differing from base, non-floating tensors differing from
            base, unreadable files, checkpoints from another θ0); during the merge, on NaN/Inf
            in an input or a merged value overflowing the output dtype (nothing is left at
            ``out``).
    """
    base_dir, out_dir = Path(base), Path(out)
    branch_dirs = [Path(c) for c in checkpoints]
    if not branch_dirs:
        raise MergeError("no checkpoints to merge")
    if len(weights) != len(branch_dirs):
        raise MergeError(f"{len(weights)} weights for {len(branch_dirs)} checkpoints")
    plan = plan_merge(weights, method=method, scale=scale, normalize=normalize)
    if method == "task_vector" and not base_is_theta0:
        raise MergeError("the task-vector form needs θ0 as the base")
    if dtype is not None and dtype not in _OUTPUT_DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {sorted(_OUTPUT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise MergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise MergeError(f"metadata is not JSON-serialisable ({err})") from err
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(f"{out_dir}: output already exists and is not an empty directory")
    if out_dir.resolve() in {d.resolve() for d in (base_dir, *branch_dirs)}:
        raise MergeError(f"{out_dir}: output is one of the inputs")

    base_specs, problems = _read_specs(base_dir)
    if problems:
        raise _problems_error(out_dir, problems)
    branch_specs = []
    for branch_dir in branch_dirs:
        specs, read_problems = _read_specs(branch_dir)
        problems += read_problems or _header_problems(base_dir, base_specs, branch_dir, specs)
        branch_specs.append(specs)
    cache = HashCache(hash_cache) if hash_cache is not None else None
    base_hashes: dict[Path, str] = {}
    if base_is_theta0 and base_fingerprint is None and any(map(recorded_theta0, branch_dirs)):
        # Needed now, to check the checkpoints' records before writing; otherwise it is
        # computed alongside the merge.
        base_fingerprint, base_hashes = _fingerprint_and_hashes(base_dir, cache)
    provenance, theta0 = _provenance_problems(
        base_dir, base_fingerprint if base_is_theta0 else None, branch_dirs
    )
    problems += provenance
    mapped = _Mapped()
    if not problems:
        problems = _non_floating_problems(base_specs, branch_specs, mapped)
    if problems:
        raise _problems_error(out_dir, problems)

    out_dtypes = {
        name: _output_dtype(_SAFETENSORS_DTYPES[spec.dtype], dtype)
        for name, spec in base_specs.items()
    }
    nbytes = {name: spec.numel * out_dtypes[name].itemsize for name, spec in base_specs.items()}
    shards = _plan_shards(list(base_specs), nbytes, max_shard_bytes)
    shard_files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    input_files = list(
        dict.fromkeys(
            [
                *(spec.file for spec in base_specs.values()),
                *(d / INDEX_FILE for d in (base_dir, *branch_dirs) if (d / INDEX_FILE).is_file()),
                *(spec.file for specs in branch_specs for spec in specs.values()),
            ]
        )
    )
    terms = _Terms(plan, base_specs, branch_specs, mapped)
    threads = threads or max(1, _cpus() - 1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp_dir = out_dir.parent / f".{out_dir.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp_dir.mkdir()
    # Input hashing re-reads every input file: run it alongside the merge (hashlib releases the
    # GIL) rather than after it.
    hash_pool = ThreadPoolExecutor(max_workers=min(4, max(2, threads)))
    # One torch thread per worker: chunks are too small to split further, and torch's own
    # threads spin-wait badly on a busy machine. With one worker the writing thread computes
    # too: no hand-off, whose wake-up latency adds up over thousands of chunks on a busy CPU.
    torch_threads = torch.get_num_threads()
    pool: ThreadPoolExecutor | _Inline
    if threads == 1:
        pool = _Inline()
        torch.set_num_threads(1)
    else:
        pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        fingerprinting: Future | None = None
        if base_is_theta0 and theta0 is None:
            fingerprinting = hash_pool.submit(_fingerprint_and_hashes, base_dir, cache)
            base_hashes = dict.fromkeys(fingerprint_files(base_dir), "")  # hashed there
        input_hashes: dict[Path, Future[str] | str] = {
            f: base_hashes.get(f) or hash_pool.submit(_cached_sha256, f, cache)
            for f in input_files
            if f not in base_hashes or base_hashes[f]
        }
        outputs: dict[str, str] = {}
        with tqdm(
            total=sum(nbytes.values()),
            desc="merging",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar:
            for file, names in zip(shard_files, shards):
                entries = [(name, out_dtypes[name], base_specs[name].shape) for name in names]
                outputs[file] = _write_shard(tmp_dir / file, entries, terms, pool, threads, bar)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(nbytes.values())},
                "weight_map": {
                    name: file for file, names in zip(shard_files, shards) for name in names
                },
            }
            outputs[INDEX_FILE] = _write_text(tmp_dir / INDEX_FILE, _to_json(index))
        side_inputs, side_outputs = _copy_side_files(base_dir, tmp_dir, dtype)
        outputs.update(side_outputs)
        if fingerprinting is not None:
            theta0, hashes = fingerprinting.result()
            input_hashes.update((f, h) for f, h in hashes.items() if f in input_files)
        inputs = {_abs(f): h if isinstance(h, str) else h.result() for f, h in input_hashes.items()}
        inputs.update((_abs(f), h) for f, h in side_inputs.items())
        manifest = {
            "format": MANIFEST_FORMAT,
            "method": plan.method,
            "formula": plan.formula,
            "weights": list(plan.weights),
            "weights_given": list(plan.weights_given),
            "normalized": plan.normalized,
            "weights_from": weights_from,
            "scale": plan.scale,
            "coefficients": {"base": plan.base_coefficient, "checkpoints": list(plan.coefficients)},
            "accumulation": _accumulation(base_specs, out_dtypes),
            "dtype": dtype,
            "output_dtypes": sorted({_dtype_name(d) for d in out_dtypes.values()}),
            "base": _abs(base_dir),
            "base_is_theta0": base_is_theta0,
            "base_fingerprint": theta0,
            "checkpoints": [_abs(d) for d in branch_dirs],
            "inputs": dict(sorted(inputs.items())),
            "outputs": {},
            "num_tensors": len(base_specs),
            "total_bytes": sum(nbytes.values()),
            "metadata": metadata or {},
            "created_by": f"merit {_version()}",
        }
        outputs[CARD_FILE] = _write_text(tmp_dir / CARD_FILE, model_card(manifest))
        manifest["outputs"] = dict(sorted(outputs.items()))
        _write_text(tmp_dir / MANIFEST_FILE, _to_json(manifest))
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above; rename cannot replace a directory portably
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        hash_pool.shutdown(wait=True, cancel_futures=True)
        mapped.release()
    return manifest


def _accumulate_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """Wider than input and output so that the single final rounding is the only one that
    matters: fp32 for 8/16-bit floats, fp64 when fp32 is involved (an fp32 sum of K identical
    fp32 tensors with weights summing to 1 is not bitwise the input)."""
    return torch.float64 if max(in_dtype.itemsize, out_dtype.itemsize) >= 4 else torch.float32


def _accumulation(base_specs: dict[str, _Spec], out_dtypes: dict[str, torch.dtype]) -> str:
    used = {
        _dtype_name(_accumulate_dtype(_SAFETENSORS_DTYPES[spec.dtype], out_dtypes[name]))
        for name, spec in base_specs.items()
        if _SAFETENSORS_DTYPES[spec.dtype].is_floating_point
    }
    return f"{' and '.join(sorted(used)) or 'nothing (no floating tensors)'}, rounded once"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Remove temporary directories of earlier merges into ``out_dir`` whose process is gone
    (killed mid-merge); a live concurrent merge's is left alone."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}{re.escape(_TMP_MARK)}(\d+)-[0-9a-f]+")
    for path in out_dir.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _output_dtype(base_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    """Base's dtype, or the requested one for floating tensors (non-floating ones are copied)."""
    if dtype is None or not base_dtype.is_floating_point:
        return base_dtype
    return _OUTPUT_DTYPES[dtype]


def _plan_shards(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in base's order, into consecutive shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own, as in Hugging Face's sharding.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


class _Terms:
    """The summands of each output tensor, and the arithmetic on one chunk of it."""

    def __init__(
        self,
        plan: MergePlan,
        base_specs: dict[str, _Spec],
        branch_specs: list[dict[str, _Spec]],
        mapped: _Mapped,
    ) -> None:
        self.plan, self.base_specs, self.branch_specs = plan, base_specs, branch_specs
        self.mapped = mapped
        self._local = threading.local()
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._free_lock = threading.Lock()

    def sources(self, name: str) -> list[tuple[_Spec, float]]:
        """(spec, coefficient) of each summand of tensor ``name``, θ0 first if it takes part."""
        terms = [(specs[name], c) for specs, c in zip(self.branch_specs, self.plan.coefficients)]
        if self.plan.base_coefficient != 0.0:
            terms.insert(0, (self.base_specs[name], self.plan.base_coefficient))
        return terms

    def _buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Per worker thread, reused for every chunk: copy_ into a preallocated buffer is several
        # times faster than converting every input into a fresh tensor.
        buffers = self._local.__dict__.setdefault("buffers", {})
        if dtype not in buffers:
            buffers[dtype] = (torch.empty(_CHUNK, dtype=dtype), torch.empty(_CHUNK, dtype=dtype))
        return buffers[dtype]

    def chunk(
        self,
        name: str,
        views: list[tuple[torch.Tensor, float]],
        start: int,
        stop: int,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements [start, stop) of the merged tensor: Σ c·θ in a wide accumulator, rounded
        once; and the buffer holding them, to :meth:`recycle` once written."""
        acc_full, scratch_full = self._buffers(_accumulate_dtype(views[0][0].dtype, out_dtype))
        n = stop - start
        acc, scratch = acc_full[:n], scratch_full[:n]
        acc.zero_()
        for view, coefficient in views:
            # Widen into the scratch buffer, then one fused multiply-add: exactly mergekit's
            # `addcmul_` from a zero accumulator (so the same bits), without its fp32 copies of
            # whole tensors.
            scratch.copy_(view[start:stop])
            acc.add_(scratch, alpha=coefficient)
        buffer = self._output_buffer(out_dtype)
        merged = buffer[:n].copy_(acc)  # the one rounding (to nearest even, as .to())
        # NaN/Inf anywhere in the sum reaches the output, so one check of the output covers both
        # non-finite inputs and overflow when rounding to a narrower dtype; a finite sum proves
        # every element finite at a fraction of the cost of isfinite().all().
        if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
            culprits = [
                str(spec.file)
                for spec, _ in self.sources(name)
                if not bool(torch.isfinite(self.mapped.tensor(spec)[start:stop]).all())
            ]
            if culprits:
                raise MergeError(f"NaN/Inf in tensor {name!r} of {', '.join(culprits)}")
            raise MergeError(f"tensor {name!r}: merged values overflow {out_dtype}")
        return merged, buffer

    def _output_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        # Recycled once written: fresh 512 KiB allocations would each be new pages for the
        # kernel to zero and fault in.
        with self._free_lock:
            free = self._free.setdefault(dtype, [])
            if free:
                return free.pop()
        return torch.empty(_CHUNK, dtype=dtype)

    def recycle(self, buffer: torch.Tensor) -> None:
        with self._free_lock:
            self._free[buffer.dtype].append(buffer)

    def pieces(
        self, name: str, out_dtype: torch.dtype, pool: ThreadPoolExecutor | _Inline
    ) -> Iterator[Future]:
        """Futures of the output bytes of tensor ``name``, in order, one per chunk."""
        base = self.base_specs[name]
        if not _SAFETENSORS_DTYPES[base.dtype].is_floating_point:
            # Validated identical in every branch: θ0's bytes, as stored.
            done: Future = Future()
            done.set_result(self.mapped.raw(base))
            yield done
            return
        views = [(self.mapped.tensor(spec), c) for spec, c in self.sources(name)]
        for start in range(0, base.numel, _CHUNK):
            stop = min(base.numel, start + _CHUNK)
            yield pool.submit(self.chunk, name, views, start, stop, out_dtype)


class _Inline:
    """An executor that runs each task as it is submitted, in the calling thread."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # re-raised by result(), in order, as from a pool
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class _ShardFile:
    """An output file written and hashed by its own thread, so that writing and hashing overlap
    the arithmetic (hashlib and file writes release the GIL)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        # Bounded: memory holds at most this many chunks waiting to be written.
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name=f"write {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, release = item
            if self.error is None:
                try:
                    self.write_now(data)
                except BaseException as err:
                    self.error = err
            if release is not None:
                release()

    def write_now(self, data: Any) -> None:
        self.file.write(data)
        self.digest.update(data)

    def write(self, data: Any, release: Callable[[], None] | None = None) -> None:
        """Queue ``data`` (then call ``release``, e.g. to recycle its buffer)."""
        if self.error is not None:
            raise self.error
        self._queue.put((data, release))

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.file.close()

    def close(self) -> str:
        self._stop()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self._stop()


def _write_shard(
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    terms: _Terms,
    pool: ThreadPoolExecutor | _Inline,
    threads: int,
    bar: tqdm,
) -> str:
    """Write one safetensors file chunk by chunk as the workers compute it; return its sha256.

    The header is known from the shapes and dtypes, so it is written first and every chunk goes
    to disk as soon as it is computed: memory holds a few chunks in flight, whatever the tensor
    sizes. Tensors are laid out widest dtype first (as safetensors does) to keep every tensor
    aligned.
    """
    order = sorted(range(len(entries)), key=lambda i: (-entries[i][1].itemsize, i))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in order:
        name, dtype, shape = entries[i]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    out = _ShardFile(path)
    try:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        window: deque[Future] = deque()
        pieces = (f for i in order for f in terms.pieces(entries[i][0], entries[i][1], pool))

        def drain(limit: int) -> None:
            while len(window) > limit:
                piece = window.popleft().result()
                if isinstance(piece, tuple):  # a merged chunk and the buffer holding it
                    data, buffer = piece[0].view(torch.uint8).numpy(), piece[1]
                    out.write(data, release=lambda b=buffer: terms.recycle(b))
                else:  # θ0's bytes of a non-floating tensor
                    data = piece
                    out.write(data)
                bar.update(data.nbytes)

        # A bounded window of chunks in flight keeps the workers busy while this thread hands
        # their results, in order, to the writer; it also bounds memory.
        for future in pieces:
            window.append(future)
            drain(2 * threads + 2)
        drain(0)
    except BaseException:
        for future in window:
            future.cancel()
        out.abort()
        raise
    return out.close()


# -- side files, card, manifest -----------------------------------------------------------------
def _copy_side_files(
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
        dst = out_dir / name
        data = src.read_bytes()
        read[src] = hashlib.sha256(data).hexdigest()
        if name == "config.json" and dtype is not None:
            config = json.loads(data)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype
            written[name] = _write_text(dst, json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            dst.write_bytes(data)
            written[name] = sha256_file(dst)
    return read, written


def describe_weights(manifest: dict) -> str:
    """How the weights were chosen, in words (said explicitly in the CLI output and card)."""
    given = manifest["weights_given"]
    total = math.fsum(given)
    if manifest["normalized"]:
        how = f"normalised: divided by their sum {total:g}"
    else:
        how = f"used as given (not normalised; they sum to {total:g})"
    return f"{manifest['weights_from']}, {how}"


def model_card(manifest: dict) -> str:
    """The output's README.md: what was merged, how, and how to check it."""
    method = manifest["method"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- merit",
        "---",
        "",
        "# Merged model",
        "",
        f"Made by `merit merge` ({manifest['created_by']}): a **{method.replace('_', '-')}** merge "
        f"of {len(manifest['checkpoints'])} checkpoints, {manifest['formula']}"
        + (f" with s = {manifest['scale']:g}" if manifest["scale"] is not None else "")
        + ".",
        "",
        f"- Weights: {describe_weights(manifest)}.",
        f"- Arithmetic: accumulated in {manifest['accumulation']}; output dtype "
        f"{manifest['dtype'] or 'as the base (' + ', '.join(manifest['output_dtypes']) + ')'}.",
        f"- Base: `{manifest['base']}` "
        + (
            "(θ0, the model the checkpoints were trained from)"
            if manifest["base_is_theta0"]
            else "(supplies structure and files only)"
        )
        + ": tensor names, shapes and dtypes (a tied `lm_head` stays tied), config, generation "
        "config, tokenizer, chat template and processor files come from it.",
        f"- θ0 fingerprint: `{manifest['base_fingerprint'] or 'unknown'}`.",
        f"- {manifest['num_tensors']} tensors, {manifest['total_bytes']:,} bytes of weights.",
        "",
        "| k | checkpoint | weight | coefficient |",
        "|---|---|---|---|",
    ]
    coefficients = manifest["coefficients"]
    for k, (ckpt, w, c) in enumerate(
        zip(manifest["checkpoints"], manifest["weights"], coefficients["checkpoints"])
    ):
        lines.append(f"| {k} | `{ckpt}` | {w:.6g} | {c:.6g} |")
    if coefficients["base"]:
        lines.append(f"| θ0 | `{manifest['base']}` | | {coefficients['base']:.6g} |")
    if manifest["metadata"]:
        lines += [
            "",
            "Recorded with the merge:",
            "",
            "```json",
            _to_json(manifest["metadata"]).strip(),
            "```",
        ]
    lines += [
        "",
        "## Proof",
        "",
        f"`{MANIFEST_FILE}` lists the sha256 of every input and output file. Check them with",
        "",
        "```bash",
        "merit verify-merge THIS_DIRECTORY",
        "```",
        "",
        "| input file | sha256 |",
        "|---|---|",
        *(f"| `{f}` | `{h}` |" for f, h in manifest["inputs"].items()),
        "",
    ]
    return "\n".join(lines)


def verify_merge(path: str | Path, *, check_inputs: bool = True) -> dict:
    """Recompute the sha256 of every file a merge manifest lists and compare.

    Every output file must be present and match; files in the directory that the manifest does
    not list are problems too. Input files are checked when still present (missing ones are
    reported as such, not as problems). Returns ``{"outputs": n_ok, "inputs": n_ok,
    "missing_inputs": [...], "problems": [one line per problem, naming the file]}``; raises
    :class:`MergeError` if there is no readable manifest.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        outputs, inputs = dict(manifest["outputs"]), dict(manifest["inputs"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MergeError(f"{manifest_file}: no readable merge manifest ({err})") from err
    problems = []
    ok_outputs = ok_inputs = 0
    for name, want in outputs.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: listed in the manifest but missing")
        elif (got := sha256_file(file)) != want:
            problems.append(f"{file}: sha256 {got[:16]}… differs from the manifest's {want[:16]}…")
        else:
            ok_outputs += 1
    for file in sorted(path.iterdir()):
        if file.name != MANIFEST_FILE and file.name not in outputs:
            problems.append(f"{file}: not listed in the manifest")
    missing = []
    if check_inputs:
        for name, want in inputs.items():
            file = Path(name)
            if not file.is_file():
                missing.append(name)
            elif (got := sha256_file(file)) != want:
                problems.append(
                    f"{file}: input changed since the merge (sha256 {got[:16]}…, "
                    f"manifest {want[:16]}…)"
                )
            else:
                ok_inputs += 1
    return {
        "outputs": ok_outputs,
        "inputs": ok_inputs,
        "missing_inputs": missing,
        "problems": problems,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("merit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _abs(path: str | Path) -> str:
    """Absolute, symlinks kept: the manifest stays checkable from any working directory."""
    return os.path.abspath(path)


def _to_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> str:
    """Write ``text`` to ``path``; return its sha256."""
    data = text.encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
