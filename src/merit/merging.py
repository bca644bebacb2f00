"""Streaming, bounded-memory weighted merge of Hugging Face checkpoints.

MERIT fine-tunes K branches independently from a base model θ0 and merges them once
(paper eq. θ̄ = Σ_k w_k θ_k, with w_k = N_k / Σ_j N_j computed by the caller).
:func:`merge_checkpoints` applies that sum tensor by tensor straight from the branches'
safetensors files, so memory stays a small multiple of the largest tensor whatever K and the
model size, and writes a Hugging Face model directory (weights, θ0's config/tokenizer files
and ``merge_manifest.json``) atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "merge_manifest.json"

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
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".pkl", ".h5", ".msgpack")
_STATE_PREFIXES = (
    "optimizer",
    "scheduler",
    "scaler",
    "rng_state",
    "trainer_state",
    "training_args",
)

_MAX_PROBLEM_LINES = 50
_HASH_CHUNK = 1024**2


class MergeError(ValueError):
    """One-line message naming the tensor or file at fault.

    When validation finds several problems they are reported together, one line each.
    """


@dataclass(frozen=True)
class _Spec:
    """Where a tensor lives and what its safetensors header says about it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def checkpoint_tensors(path: str | Path) -> dict[str, Path]:
    """Map each tensor name of a Hugging Face checkpoint directory to the file holding it.

    Reads the ``weight_map`` of ``model.safetensors.index.json`` for sharded checkpoints,
    otherwise the header of ``model.safetensors``. Order is the index's (or the file's sorted
    key order). Raises :class:`MergeError` if the directory has neither, the index is
    malformed or names a shard that does not exist.
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
        try:
            with safe_open(single, framework="pt") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as err:
            raise MergeError(f"{single}: unreadable safetensors file ({err})") from err
        return dict.fromkeys(names, single)
    raise MergeError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are supported)")


def merge_checkpoints(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write θ̄ = Σ_k weights[k] · checkpoints[k] to ``out`` as a Hugging Face model directory.

    Args:
        base: θ0's model directory. It fixes the output's tensor names, order, shapes and
            default dtypes (so a tied ``lm_head`` stays absent), and supplies the non-weight
            files (config, tokenizer, chat template, ...) copied to ``out``. Its floating
            values are not used.
        checkpoints: the branch model directories (safetensors, single or sharded).
        weights: one weight per branch, used as given (the caller normalises).
        out: output directory; must not exist or be empty. Written atomically through a
            temporary sibling directory, so a failure leaves nothing at ``out``.
        dtype: output dtype of floating tensors ("bfloat16", "float16" or "float32");
            ``None`` keeps θ0's dtype per tensor. When given, config.json's dtype is updated.
        max_shard_bytes: largest tensor data per output file; beyond it the output is
            sharded as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
        metadata: extra JSON-able information recorded under "metadata" in the manifest.
        progress: show a tqdm bar over tensors.

    Returns:
        The manifest, also written to ``out/merge_manifest.json``: method, weights, dtype,
        base, checkpoints, sha256 of every input safetensors file ("inputs") and of every
        output file ("outputs"), num_tensors, total_bytes and metadata.

    Raises:
        MergeError: before anything is written, listing every problem found in the headers
            (missing/extra tensors, shape or dtype differing from θ0, non-floating tensors
            differing from θ0, unreadable files); during the merge, on NaN/Inf in an input
            or a merged value overflowing the output dtype (nothing is left at ``out``).
    """
    base_dir, out_dir = Path(base), Path(out)
    branch_dirs = [Path(c) for c in checkpoints]
    weights = [float(w) for w in weights]
    if not branch_dirs:
        raise MergeError("no checkpoints to merge")
    if len(weights) != len(branch_dirs):
        raise MergeError(f"{len(weights)} weights for {len(branch_dirs)} checkpoints")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite, got {weights}")
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

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        base_specs, problems = _read_specs(base_dir, stack, handles)
        if problems:
            raise _problems_error(out_dir, problems)
        branch_specs = []
        for branch_dir in branch_dirs:
            specs, read_problems = _read_specs(branch_dir, stack, handles)
            problems += read_problems or _header_problems(base_dir, base_specs, branch_dir, specs)
            branch_specs.append(specs)
        if not problems:
            problems = _non_floating_problems(base_specs, branch_specs, handles)
        if problems:
            raise _problems_error(out_dir, problems)

        out_dtypes = {
            name: _output_dtype(_SAFETENSORS_DTYPES[spec.dtype], dtype)
            for name, spec in base_specs.items()
        }
        nbytes = {
            name: math.prod(spec.shape) * out_dtypes[name].itemsize
            for name, spec in base_specs.items()
        }
        shards = _plan_shards(list(base_specs), nbytes, max_shard_bytes)
        shard_files = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [
                f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
            ]
        )
        input_files = [
            spec.file for specs in (base_specs, *branch_specs) for spec in specs.values()
        ]

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
        tmp_dir.mkdir()
        # Input hashing re-reads every input file; run it alongside the merge (hashlib releases
        # the GIL) rather than after it.
        pool = ThreadPoolExecutor(max_workers=4)
        try:
            input_hashes: dict[str, Future[str]] = {
                str(file): pool.submit(_sha256_file, file) for file in dict.fromkeys(input_files)
            }
            buffers: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

            def merged_tensor(name: str) -> torch.Tensor:
                return _merge_tensor(
                    name,
                    base_specs[name],
                    [specs[name] for specs in branch_specs],
                    weights,
                    out_dtypes[name],
                    handles,
                    buffers,
                )

            outputs: dict[str, str] = {}
            with tqdm(
                total=len(base_specs), desc="merging", unit="tensor", disable=not progress
            ) as bar:
                for file, names in zip(shard_files, shards):
                    entries = [(name, out_dtypes[name], base_specs[name].shape) for name in names]
                    outputs[file] = _write_shard(tmp_dir / file, entries, merged_tensor, bar)
            if len(shards) > 1:
                index = {
                    "metadata": {"total_size": sum(nbytes.values())},
                    "weight_map": {
                        name: file for file, names in zip(shard_files, shards) for name in names
                    },
                }
                outputs[INDEX_FILE] = _write_text(tmp_dir / INDEX_FILE, _to_json(index))
            outputs.update(_copy_side_files(base_dir, tmp_dir, dtype))

            manifest = {
                "method": "linear",
                "weights": weights,
                "dtype": dtype,
                "base": str(base_dir),
                "checkpoints": [str(d) for d in branch_dirs],
                "inputs": {file: future.result() for file, future in input_hashes.items()},
                "outputs": dict(sorted(outputs.items())),
                "num_tensors": len(base_specs),
                "total_bytes": sum(nbytes.values()),
                "metadata": metadata or {},
            }
            _write_text(tmp_dir / MANIFEST_FILE, _to_json(manifest))
            if out_dir.exists():
                out_dir.rmdir()  # checked empty above; rename cannot replace a directory portably
            os.replace(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return manifest


def _read_specs(
    path: Path, stack: ExitStack, handles: dict[Path, Any]
) -> tuple[dict[str, _Spec], list[str]]:
    """Read name, dtype and shape of every tensor of a checkpoint from the safetensors headers.

    Opens each file once (kept in ``handles`` for the merge); returns problems instead of
    raising so that all checkpoints can be reported at once.
    """
    try:
        files = checkpoint_tensors(path)
    except MergeError as err:
        return {}, [str(err)]
    specs: dict[str, _Spec] = {}
    problems: list[str] = []
    for name, file in files.items():
        if file not in handles:
            try:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            except (SafetensorError, OSError) as err:
                problems.append(f"{file}: unreadable safetensors file ({err})")
                handles[file] = None
        handle = handles[file]
        if handle is None:
            continue
        try:
            header = handle.get_slice(name)
        except SafetensorError:
            problems.append(f"{file}: tensor {name!r} listed in the index is not in the file")
            continue
        spec = _Spec(file, header.get_dtype(), tuple(header.get_shape()))
        if spec.dtype not in _SAFETENSORS_DTYPES:
            problems.append(f"{file}: tensor {name!r} has unsupported dtype {spec.dtype}")
        specs[name] = spec
    return specs, problems


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
    base_specs: dict[str, _Spec], branch_specs: list[dict[str, _Spec]], handles: dict[Path, Any]
) -> list[str]:
    """Integer/bool buffers cannot be averaged: θ0's is kept, so every branch must equal it.

    They are small (position ids, masks), so they are compared before anything is written.
    """
    problems = []
    for name, spec in base_specs.items():
        if _SAFETENSORS_DTYPES[spec.dtype].is_floating_point:
            continue
        expected = handles[spec.file].get_tensor(name)
        for specs in branch_specs:
            if not torch.equal(handles[specs[name].file].get_tensor(name), expected):
                problems.append(
                    f"{specs[name].file}: non-floating tensor {name!r} differs from base {spec.file}"
                )
    return problems


def _problems_error(out_dir: Path, problems: list[str]) -> MergeError:
    """Collect validation problems into a single error, one line each."""
    lines = problems[:_MAX_PROBLEM_LINES]
    if len(problems) > _MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - _MAX_PROBLEM_LINES} more")
    return MergeError(
        "\n".join([f"cannot merge into {out_dir}: {len(problems)} problem(s)", *lines])
    )


def _output_dtype(base_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    """θ0's dtype, or the requested one for floating tensors (non-floating ones are copied)."""
    if dtype is None or not base_dtype.is_floating_point:
        return base_dtype
    return _OUTPUT_DTYPES[dtype]


def _plan_shards(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in θ0's order, into consecutive shards of at most ``max_shard_bytes``.

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


def _merge_tensor(
    name: str,
    base: _Spec,
    branches: list[_Spec],
    weights: list[float],
    out_dtype: torch.dtype,
    handles: dict[Path, Any],
    buffers: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Compute one output tensor: paper eq. θ̄ = Σ_k w_k θ_k, rounded once to ``out_dtype``.

    Non-floating tensors are θ0's (validated identical in every branch beforehand).
    """
    in_dtype = _SAFETENSORS_DTYPES[base.dtype]
    if not in_dtype.is_floating_point:
        return handles[base.file].get_tensor(name)
    # The accumulator is wider than both input and output so the single final rounding is the
    # only one that matters: fp32 for 8/16-bit floats, fp64 for fp32 (an fp32 sum of K identical
    # fp32 tensors with weights summing to 1 is not bitwise the input).
    acc_dtype = torch.float64 if max(in_dtype.itemsize, out_dtype.itemsize) >= 4 else torch.float32
    numel = math.prod(base.shape)
    acc, scratch = buffers.get(acc_dtype, (torch.empty(0), torch.empty(0)))
    if acc.numel() < numel:
        # Reused across tensors: copy_ into a preallocated buffer is several times faster than
        # converting every input into a fresh tensor, and bounds memory by the largest tensor.
        acc = torch.empty(numel, dtype=acc_dtype)
        scratch = torch.empty(numel, dtype=acc_dtype)
        buffers[acc_dtype] = (acc, scratch)
    acc, scratch = acc[:numel].view(base.shape), scratch[:numel].view(base.shape)
    for k, (spec, weight) in enumerate(zip(branches, weights)):
        # Cast into the wide scratch first: a mixed-dtype add_ is slower and a mixed-dtype mul
        # would compute in the narrow input dtype.
        scratch.copy_(handles[spec.file].get_tensor(name))
        if k == 0:
            torch.mul(scratch, weight, out=acc)
        else:
            acc.add_(scratch, alpha=weight)
    merged = acc.to(out_dtype)
    # NaN/Inf anywhere in the sum reaches the output, so one check of the output covers both
    # non-finite inputs and overflow when rounding to a narrower dtype; tell them apart only
    # on failure.
    if not _all_finite(merged):
        culprits = [
            str(spec.file)
            for spec in branches
            if not torch.isfinite(handles[spec.file].get_tensor(name)).all()
        ]
        if culprits:
            raise MergeError(f"NaN/Inf in tensor {name!r} of {', '.join(culprits)}")
        raise MergeError(f"tensor {name!r}: merged values overflow {out_dtype}")
    return merged


def _all_finite(tensor: torch.Tensor) -> bool:
    """True if no element is NaN/Inf.

    A finite sum proves every element finite and costs a fraction of ``isfinite().all()``;
    the elementwise check only runs when the sum is not finite (which may be mere overflow).
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _write_shard(
    path: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    make_tensor: Callable[[str], torch.Tensor],
    bar: tqdm,
) -> str:
    """Write one safetensors file tensor by tensor; return its sha256.

    The header is known from the shapes and dtypes, so it is written first and each tensor is
    streamed to disk as soon as it is computed: memory does not grow with the shard size.
    Tensors are laid out widest dtype first (as safetensors does) to keep every tensor aligned.
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
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(chunk)
            digest.update(chunk)
        for i in order:
            name, dtype, shape = entries[i]
            tensor = make_tensor(name)
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise MergeError(f"tensor {name!r}: computed tensor does not match its header")
            f.write(data)
            digest.update(data)
            bar.update(1)
    return digest.hexdigest()


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str | None) -> dict[str, str]:
    """Copy θ0's non-weight files (config, tokenizer, templates, ...); return their sha256s.

    Weights in any format, their indexes, training state and an old manifest are skipped.
    With a ``dtype`` override, config.json's dtype entry is updated so that
    ``from_pretrained(dtype="auto")`` loads the weights in the dtype they are stored in.
    """
    hashes = {}
    for src in sorted(base_dir.iterdir()):
        name = src.name
        if (
            not src.is_file()
            or name == MANIFEST_FILE
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.startswith(_STATE_PREFIXES)
        ):
            continue
        dst = out_dir / name
        if name == "config.json" and dtype is not None:
            config = json.loads(src.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype
            hashes[name] = _write_text(dst, json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src, dst)
            hashes[name] = _sha256_file(dst)
    return hashes


def _to_json(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _write_text(path: Path, text: str) -> str:
    """Write ``text`` to ``path``; return its sha256."""
    data = text.encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
