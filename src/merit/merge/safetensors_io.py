"""Reading and writing safetensors checkpoints without the safetensors package.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range) and the raw little-endian tensor bytes. Parsing it directly lets the merge read tensors in
place from memory maps (:class:`MappedFiles`) and write an output file before its tensors exist
(:func:`shard_header`, :class:`ShardWriter`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merit.merge.errors import MergeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype names <-> torch dtypes (the on-disk format is little-endian).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lives: its file, safetensors dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def is_floating(self) -> bool:
        return self.torch_dtype.is_floating_point


# -- reading ----------------------------------------------------------------------------------
def read_safetensors_header(file: str | Path) -> dict[str, TensorSpec]:
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
    return {
        name: _spec(file, name, info, data_start, size)
        for name, info in header.items()
        if name != "__metadata__"
    }


def _spec(file: Path, name: str, info: Any, data_start: int, size: int) -> TensorSpec:
    """One header entry, checked against its shape and the file's size."""
    try:
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise MergeError(f"{file}: malformed header entry for tensor {name!r}") from err
    if dtype not in SAFETENSORS_DTYPES:
        raise MergeError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0:
        raise MergeError(f"{file}: tensor {name!r} has inconsistent offsets for its shape")
    if data_start + end > size:
        raise MergeError(f"{file}: tensor {name!r} lies beyond the end of the file")
    return TensorSpec(file, dtype, shape, data_start + begin, data_start + end)


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


def read_specs(path: Path) -> tuple[dict[str, TensorSpec], list[str]]:
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


class MappedFiles:
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

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """The flat tensor in place (no copy)."""
        if spec.numel == 0:
            return torch.empty(0, dtype=spec.torch_dtype)
        return torch.frombuffer(
            self._map(spec.file), dtype=spec.torch_dtype, offset=spec.start, count=spec.numel
        )

    def raw(self, spec: TensorSpec) -> memoryview:
        return memoryview(self._map(spec.file))[spec.start : spec.end]

    def drop(self, spec: TensorSpec) -> None:
        """Unmap the pages of a tensor that is done with (MADV_DONTNEED): the page cache keeps
        them, but they leave this process's resident set, so a merge of K branches does not
        grow by K checkpoints of mapped pages. A later read faults them in again from the file
        (nothing was written to them), so an early drop costs time, never correctness."""
        m = self._maps.get(spec.file)
        if m is None or spec.numel == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = spec.start - spec.start % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            m.madvise(mmap.MADV_DONTNEED, start, min(spec.end, len(m)) - start)

    def release(self) -> None:
        # Unmapping is left to the garbage collector: an explicit close() raises while a view
        # is alive (e.g. in an exception's traceback).
        self._maps.clear()


# -- writing ----------------------------------------------------------------------------------
def shard_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
) -> tuple[bytes, list[int]]:
    """The header of a safetensors file holding ``entries`` (name, dtype, shape), and the order
    of ``entries`` in the file: the 8-byte length and the JSON, padded so that the data starts
    8-byte aligned. Tensors are laid out widest dtype first (as safetensors does) to keep every
    tensor aligned.
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
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes, order


class ShardWriter:
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
        """Wait for every queued write; return the file's sha256."""
        self._stop()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self._stop()


def distances_from(base_dir: Path, model_dirs: list[Path]) -> list[float]:
    """‖θ − θ0‖ (fp64, over θ0's floating-point tensors) of each model, read tensor by tensor so
    that no whole model is in memory."""
    from contextlib import ExitStack

    from safetensors import safe_open

    base = checkpoint_tensors(base_dir)
    others = [checkpoint_tensors(d) for d in model_dirs]
    sq = [0.0] * len(model_dirs)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(file: Path, name: str) -> torch.Tensor:
            if file not in handles:  # each file opened once
                handles[file] = stack.enter_context(safe_open(str(file), "pt"))
            return handles[file].get_tensor(name)

        for name, f in base.items():
            t0 = read(f, name)
            if not t0.is_floating_point():
                continue
            for i, files in enumerate(others):
                if name not in files:
                    raise MergeError(f"{model_dirs[i]}: no tensor {name} (θ0 has it)")
                sq[i] += float((read(files[name], name).double() - t0.double()).pow(2).sum())
    return [s**0.5 for s in sq]
