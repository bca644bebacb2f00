"""Streaming, bounded-memory weighted merge of Hugging Face checkpoints, with proof.

MERIT fine-tunes K branches independently from a base model θ0 and merges them once
(paper eq. 3: θ̄ = Σ_k w_k θ_k, with w_k = N_k / Σ_j N_j computed by the caller).
:func:`merge_checkpoints` applies that sum (or its task-vector form θ0 + s·Σ_k w_k (θ_k − θ0))
in three steps, as a planner and an executor:

* :func:`plan_merge` checks everything before a byte is written (arguments, every checkpoint's
  tensors against θ0's, provenance) and fixes the coefficients and the output's shard layout;
* :func:`execute` streams the sum chunk by chunk straight from the checkpoints' memory-mapped
  safetensors files into the output shards, so memory stays a few cache-sized buffers whatever
  K and the model size, while the inputs are hashed alongside;
* :func:`write` completes the Hugging Face model directory (θ0's config/tokenizer/processor files,
  a model card and ``merge_manifest.json`` with the sha256 of every input and output file),
  which is then renamed into place atomically.

:func:`merit.merge.verify.verify_merge` re-checks the result. Only torch is imported: no
transformers, no datasets, no safetensors (see :mod:`merit.merge.safetensors_io`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merit.merge.arithmetic import MergeTerms, Weighting, accumulate_dtype, plan_weighting
from merit.merge.card import model_card
from merit.merge.errors import MergeError, problems_error
from merit.merge.hashing import HashCache, cached_sha256, fingerprint_and_hashes, fingerprint_files
from merit.merge.manifest import CARD_FILE, MergeManifest, json_text, recorded_theta0
from merit.merge.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    MappedFiles,
    ShardWriter,
    TensorSpec,
    read_specs,
    shard_header,
)
from merit.merge.staging import copy_side_files, make_staging_dir, publish, write_bytes
from merit.merge.validation import header_problems, kept_problems, provenance_problems

_OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class MergeOptions:
    """How to merge, beyond what and into where: :func:`merge_checkpoints`' keywords.

    Attributes:
        method, scale, normalize: see :func:`~merit.merge.arithmetic.plan_weighting`.
        weights_from: where the weights come from, recorded in the manifest and model card.
        base_is_theta0: whether the base is the θ0 the checkpoints were trained from (else it
            only supplies structure and files). Checkpoints merit recorded as trained from
            another θ0 are refused.
        base_fingerprint: θ0's fingerprint if already known; computed otherwise.
        dtype: output dtype of floating tensors ("bfloat16", "float16" or "float32"); ``None``
            keeps base's per tensor. When given, config.json's dtype is updated.
        max_shard_bytes: largest tensor data per output file; beyond it the output is sharded
            as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
        keep: tensors that are θ0's in every checkpoint (frozen parameters): written as θ0's
            bytes (cast once to ``dtype`` if given), and refused where a checkpoint differs.
        metadata: extra JSON-able information recorded under "metadata" in the manifest.
        hash_cache: directory of a :class:`~merit.merge.hashing.HashCache` for input hashes;
            ``None`` hashes anew.
        threads: worker threads for the arithmetic (default: the CPUs available, minus one for
            writing and hashing).
        progress: show a progress bar.
    """

    method: str = "linear"
    scale: float = 1.0
    normalize: bool = False
    weights_from: str = "explicit"
    base_is_theta0: bool = True
    base_fingerprint: str | None = None
    dtype: str | None = None
    max_shard_bytes: int = 2 * 1024**3
    keep: frozenset[str] = frozenset()
    metadata: dict | None = None
    hash_cache: str | Path | None = None
    threads: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class Shard:
    """One output safetensors file and the tensors it holds, in θ0's order."""

    file: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before the first byte is written.

    ``theta0`` is θ0's fingerprint when known before the merge (given, recorded, or computed to
    check the checkpoints' records, then with the sha256 of its files in ``theta0_hashes``).
    """

    base_dir: Path
    branch_dirs: tuple[Path, ...]
    out_dir: Path
    options: MergeOptions
    weighting: Weighting
    base_specs: dict[str, TensorSpec]
    branch_specs: tuple[dict[str, TensorSpec], ...]
    out_dtypes: dict[str, torch.dtype]
    shards: tuple[Shard, ...]
    input_files: tuple[Path, ...]
    theta0: str | None
    theta0_hashes: dict[Path, str]
    threads: int

    def nbytes(self, name: str) -> int:
        return self.base_specs[name].numel * self.out_dtypes[name].itemsize

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(name) for name in self.base_specs)

    @property
    def hash_cache(self) -> HashCache | None:
        cache = self.options.hash_cache
        return HashCache(cache) if cache is not None else None


def merge_checkpoints(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    **options: Any,
) -> MergeManifest:
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
        **options: the fields of :class:`MergeOptions` (how to merge, what to record).

    Returns:
        The manifest, also written to ``out/merge_manifest.json``.

    Raises:
        MergeError: before anything is written, listing every problem found (missing/extra
            tensors, shape or dtype differing from base, non-floating tensors differing from
            base, unreadable files, checkpoints from another θ0); during the merge, on NaN/Inf
            in an input or a merged value overflowing the output dtype (nothing is left at
            ``out``).
    """
    plan = plan_merge(base, checkpoints, weights, out, MergeOptions(**options))
    staging = make_staging_dir(plan.out_dir)
    try:
        with _InputHashing(plan) as hashing:
            shard_hashes = execute(plan, staging)
            theta0, inputs = hashing.result()
        manifest = write(plan, staging, shard_hashes, theta0, inputs)
        publish(staging, plan.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# -- plan -------------------------------------------------------------------------------------
def plan_merge(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    options: MergeOptions | None = None,
) -> MergePlan:
    """Check the arguments and every checkpoint against ``base``, and fix the coefficients and
    the output's layout; :class:`MergeError` listing every problem found, before any write."""
    options = options or MergeOptions()
    base_dir, out_dir = Path(base), Path(out)
    branch_dirs = tuple(Path(c) for c in checkpoints)
    weighting = _check_arguments(base_dir, branch_dirs, weights, out_dir, options)
    base_specs, branch_specs, theta0, theta0_hashes = _check_checkpoints(
        base_dir, branch_dirs, out_dir, options
    )
    out_dtypes = {
        name: _output_dtype(spec.torch_dtype, options.dtype) for name, spec in base_specs.items()
    }
    nbytes = {name: spec.numel * out_dtypes[name].itemsize for name, spec in base_specs.items()}
    input_files = dict.fromkeys(
        [
            *(spec.file for spec in base_specs.values()),
            *(d / INDEX_FILE for d in (base_dir, *branch_dirs) if (d / INDEX_FILE).is_file()),
            *(spec.file for specs in branch_specs for spec in specs.values()),
        ]
    )
    return MergePlan(
        base_dir=base_dir,
        branch_dirs=branch_dirs,
        out_dir=out_dir,
        options=options,
        weighting=weighting,
        base_specs=base_specs,
        branch_specs=branch_specs,
        out_dtypes=out_dtypes,
        shards=_plan_shards(list(base_specs), nbytes, options.max_shard_bytes),
        input_files=tuple(input_files),
        theta0=theta0,
        theta0_hashes=theta0_hashes,
        threads=options.threads or max(1, _cpus() - 1),
    )


def _check_arguments(
    base_dir: Path,
    branch_dirs: tuple[Path, ...],
    weights: Sequence[float],
    out_dir: Path,
    options: MergeOptions,
) -> Weighting:
    """The weighting, once the arguments make sense on their own (the files are not read)."""
    if not branch_dirs:
        raise MergeError("no checkpoints to merge")
    if len(weights) != len(branch_dirs):
        raise MergeError(f"{len(weights)} weights for {len(branch_dirs)} checkpoints")
    o = options
    weighting = plan_weighting(weights, method=o.method, scale=o.scale, normalize=o.normalize)
    if o.method == "task_vector" and not o.base_is_theta0:
        raise MergeError("the task-vector form needs θ0 as the base")
    if o.dtype is not None and o.dtype not in _OUTPUT_DTYPES:
        raise MergeError(f"dtype {o.dtype!r} is not one of {sorted(_OUTPUT_DTYPES)}")
    if o.max_shard_bytes <= 0:
        raise MergeError(f"max_shard_bytes must be positive, got {o.max_shard_bytes}")
    try:
        json.dumps(o.metadata)
    except (TypeError, ValueError) as err:
        raise MergeError(f"metadata is not JSON-serialisable ({err})") from err
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(f"{out_dir}: output already exists and is not an empty directory")
    if out_dir.resolve() in {d.resolve() for d in (base_dir, *branch_dirs)}:
        raise MergeError(f"{out_dir}: output is one of the inputs")
    return weighting


def _check_checkpoints(
    base_dir: Path, branch_dirs: tuple[Path, ...], out_dir: Path, options: MergeOptions
) -> tuple[dict[str, TensorSpec], tuple[dict[str, TensorSpec], ...], str | None, dict[Path, str]]:
    """θ0's and every checkpoint's tensors, θ0's fingerprint when known and the hashes read to
    know it; one :class:`MergeError` listing every problem with the checkpoints."""
    base_specs, problems = read_specs(base_dir)
    if problems:
        raise problems_error(out_dir, problems)
    branch_specs = []
    for branch_dir in branch_dirs:
        specs, read_problems = read_specs(branch_dir)
        problems += read_problems or header_problems(base_dir, base_specs, branch_dir, specs)
        branch_specs.append(specs)
    theta0, hashes = options.base_fingerprint, {}
    if options.base_is_theta0 and theta0 is None and any(map(recorded_theta0, branch_dirs)):
        # Needed now, to check the checkpoints' records before writing; otherwise it is
        # computed alongside the merge.
        theta0, hashes = fingerprint_and_hashes(base_dir, options.hash_cache)
    provenance, theta0 = provenance_problems(
        base_dir, theta0 if options.base_is_theta0 else None, list(branch_dirs)
    )
    problems += provenance
    if not problems:
        problems = kept_problems(base_specs, branch_specs, options.keep)
    if problems:
        raise problems_error(out_dir, problems)
    return base_specs, tuple(branch_specs), theta0, hashes


def _output_dtype(base_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    """Base's dtype, or the requested one for floating tensors (non-floating ones are copied)."""
    if dtype is None or not base_dtype.is_floating_point:
        return base_dtype
    return _OUTPUT_DTYPES[dtype]


def _plan_shards(
    names: list[str], nbytes: dict[str, int], max_shard_bytes: int
) -> tuple[Shard, ...]:
    """Split tensors, in base's order, into consecutive shards of at most ``max_shard_bytes``,
    named as Hugging Face names them (one ``model.safetensors``, or ``model-0000i-of-0000N``).

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
    if len(shards) == 1:
        return (Shard(SINGLE_FILE, tuple(shards[0])),)
    n = len(shards)
    return tuple(
        Shard(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(names))
        for i, names in enumerate(shards, start=1)
    )


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- execute ----------------------------------------------------------------------------------
class InlineExecutor(Executor):
    """An executor that runs each task as it is submitted, in the calling thread."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # re-raised by result(), in order, as from a pool
            future.set_exception(err)
        return future


class _InputHashing:
    """The sha256 of every input file (and θ0's fingerprint if still unknown), computed
    alongside the merge rather than after it: hashlib releases the GIL."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        cache = plan.hash_cache
        self._pool = ThreadPoolExecutor(max_workers=min(4, max(2, plan.threads)))
        self._fingerprinting: Future | None = None
        known = plan.theta0_hashes
        if plan.options.base_is_theta0 and plan.theta0 is None:
            self._fingerprinting = self._pool.submit(fingerprint_and_hashes, plan.base_dir, cache)
            known = dict.fromkeys(fingerprint_files(plan.base_dir), "")  # hashed there
        self._hashes: dict[Path, Future[str] | str] = {
            f: known.get(f) or self._pool.submit(cached_sha256, f, cache)
            for f in plan.input_files
            if f not in known or known[f]
        }

    def __enter__(self) -> _InputHashing:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def result(self) -> tuple[str | None, dict[str, str]]:
        """θ0's fingerprint (``None`` if unknown) and absolute input path -> sha256."""
        theta0, hashes = self.plan.theta0, dict(self._hashes)
        if self._fingerprinting is not None:
            theta0, base_hashes = self._fingerprinting.result()
            hashes.update((f, h) for f, h in base_hashes.items() if f in self.plan.input_files)
        return theta0, {_abs(f): h if isinstance(h, str) else h.result() for f, h in hashes.items()}


def execute(plan: MergePlan, staging: Path) -> dict[str, str]:
    """Stream the merge into ``staging``: each shard computed chunk by chunk by ``plan.threads``
    workers and written as it is computed. Returns each shard's file name -> sha256."""
    mapped = MappedFiles()
    terms = MergeTerms(
        plan.weighting, plan.base_specs, plan.branch_specs, mapped, plan.options.keep
    )
    # One torch thread per worker: chunks are too small to split further, and torch's own
    # threads spin-wait badly on a busy machine. With one worker the writing thread computes
    # too: no hand-off, whose wake-up latency adds up over thousands of chunks on a busy CPU.
    torch_threads = torch.get_num_threads()
    pool: Executor
    if plan.threads == 1:
        pool = InlineExecutor()
        torch.set_num_threads(1)
    else:
        pool = ThreadPoolExecutor(plan.threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        with tqdm(
            total=plan.total_bytes,
            desc="merging",
            unit="B",
            unit_scale=True,
            disable=not plan.options.progress,
        ) as bar:
            return {
                shard.file: _write_shard(staging / shard.file, plan, shard, terms, pool, bar)
                for shard in plan.shards
            }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        mapped.release()


def _write_shard(
    path: Path, plan: MergePlan, shard: Shard, terms: MergeTerms, pool: Executor, bar: tqdm
) -> str:
    """Write one safetensors file chunk by chunk as the workers compute it; return its sha256.

    The header is known from the shapes and dtypes, so it is written first and every chunk goes
    to disk as soon as it is computed: memory holds a few chunks in flight, whatever the tensor
    sizes.
    """
    entries = [(name, plan.out_dtypes[name], plan.base_specs[name].shape) for name in shard.names]
    header, order = shard_header(entries)
    out = ShardWriter(path)
    window: deque[Future] = deque()
    # A bounded window of chunks in flight keeps the workers busy while this thread hands
    # their results, in order, to the writer; it also bounds memory.
    limit = 2 * plan.threads + 2
    try:
        out.write(header)
        for i in order:
            name, dtype, _ = entries[i]
            for future in terms.pieces(name, dtype, pool):
                window.append(future)
                _drain(window, limit, out, terms, bar)
        _drain(window, 0, out, terms, bar)
    except BaseException:
        for future in window:
            future.cancel()
        out.abort()
        raise
    return out.close()


def _drain(
    window: deque[Future], limit: int, out: ShardWriter, terms: MergeTerms, bar: tqdm
) -> None:
    """Hand the oldest results to the writer until at most ``limit`` are in flight."""
    while len(window) > limit:
        piece = window.popleft().result()
        if isinstance(piece, tuple):  # a merged chunk and the buffer holding it
            data, buffer = piece[0].view(torch.uint8).numpy(), piece[1]
            out.write(data, release=functools.partial(terms.recycle, buffer))
        else:  # θ0's bytes of a non-floating tensor
            data = piece
            out.write(data)
        bar.update(data.nbytes)


# -- write ------------------------------------------------------------------------------------
def write(
    plan: MergePlan,
    staging: Path,
    shard_hashes: dict[str, str],
    theta0: str | None,
    inputs: dict[str, str],
) -> MergeManifest:
    """Complete ``staging`` around its shards: the index of a sharded output, θ0's side files,
    the model card and the manifest, which is returned."""
    outputs = dict(shard_hashes)
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": {name: shard.file for shard in plan.shards for name in shard.names},
        }
        outputs[INDEX_FILE] = write_bytes(staging / INDEX_FILE, json_text(index).encode())
    side_inputs, side_outputs = copy_side_files(plan.base_dir, staging, plan.options.dtype)
    outputs.update(side_outputs)
    inputs = {**inputs, **{_abs(f): h for f, h in side_inputs.items()}}
    manifest = _manifest(plan, theta0, inputs)
    outputs[CARD_FILE] = write_bytes(staging / CARD_FILE, model_card(manifest).encode())
    manifest = dataclasses.replace(manifest, outputs=dict(sorted(outputs.items())))
    manifest.write(staging)
    return manifest


def _manifest(plan: MergePlan, theta0: str | None, inputs: dict[str, str]) -> MergeManifest:
    """The merge's record, less its outputs (the model card, one of them, is made from it)."""
    o, w = plan.options, plan.weighting
    return MergeManifest(
        method=w.method,
        formula=w.formula,
        weights=list(w.weights),
        weights_given=list(w.weights_given),
        normalized=w.normalized,
        weights_from=o.weights_from,
        scale=w.scale,
        base_coefficient=w.base_coefficient,
        coefficients=list(w.coefficients),
        accumulation=_accumulation(plan),
        dtype=o.dtype,
        output_dtypes=sorted({_dtype_name(d) for d in plan.out_dtypes.values()}),
        base=_abs(plan.base_dir),
        base_is_theta0=o.base_is_theta0,
        base_fingerprint=theta0,
        checkpoints=[_abs(d) for d in plan.branch_dirs],
        inputs=dict(sorted(inputs.items())),
        outputs={},
        num_tensors=len(plan.base_specs),
        total_bytes=plan.total_bytes,
        metadata=o.metadata or {},
        created_by=f"merit {_version()}",
    )


def _accumulation(plan: MergePlan) -> str:
    used = {
        _dtype_name(accumulate_dtype(spec.torch_dtype, plan.out_dtypes[name]))
        for name, spec in plan.base_specs.items()
        if spec.is_floating
    }
    return f"{' and '.join(sorted(used)) or 'nothing (no floating tensors)'}, rounded once"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("merit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _abs(path: str | Path) -> str:
    """Absolute, symlinks kept: the manifest stays checkable from any working directory."""
    return os.path.abspath(path)
