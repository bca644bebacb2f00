"""Streaming, bounded-memory merge of Hugging Face checkpoints, with proof.

MERIT fine-tunes K branches independently from a base model θ0 and merges them once
(paper eq. 3: θ̄ = Σ_k w_k θ_k, with w_k = N_k / Σ_j N_j computed by the caller).
:func:`merge_checkpoints` applies that sum, or any other registered merge method
(:mod:`merit.merge.methods`: the task-vector form θ0 + s·Σ_k w_k (θ_k − θ0), ...), in three
steps, as a planner and an executor:

* :func:`~merit.merge.planning.plan_merge` checks everything before a byte is written
  (arguments, the method and its parameters, every checkpoint's tensors against θ0's,
  provenance) and fixes the coefficients and the output's shard layout;
* :func:`execute` streams the merge chunk by chunk straight from the checkpoints' memory-mapped
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
import os
import shutil
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merit.hashing import cached_sha256, fingerprint_and_hashes, fingerprint_files
from merit.merge.arithmetic import MergeTerms, compute_dtype
from merit.merge.card import model_card
from merit.merge.manifest import CARD_FILE, MergeManifest, json_text
from merit.merge.planning import MergeOptions, MergePlan, Shard, plan_merge
from merit.merge.safetensors_io import INDEX_FILE, MappedFiles, ShardWriter, shard_header
from merit.merge.staging import copy_side_files, make_staging_dir, publish, write_bytes

__all__ = [
    "MergeOptions",
    "MergePlan",
    "Shard",
    "execute",
    "merge_checkpoints",
    "plan_merge",
    "write",
]


def merge_checkpoints(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    **options: Any,
) -> MergeManifest:
    """Write the merge of ``checkpoints`` to ``out`` as a Hugging Face model directory.

    ``method="linear"``: θ̄ = Σ_k w_k θ_k (paper eq. 3). ``method="task_vector"``:
    θ̄ = θ0 + s·Σ_k w_k (θ_k − θ0) with θ0 = ``base`` and s = ``scale``. Any other registered
    method by name, with its ``params``. For these two (linear combinations) floating tensors
    are accumulated in fp32 (fp64 when an input or the output is fp32) and rounded once; the
    arithmetic is mergekit's (fused multiply-add per checkpoint, in order), so a linear merge
    of 8/16-bit checkpoints equals mergekit's bit for bit.

    Args:
        base: a model directory fixing the output's tensor names, order, shapes and default
            dtypes (a tied ``lm_head`` stays absent, so stays tied) and supplying the non-weight
            files (config, generation config, tokenizer, chat template, processor files)
            copied to ``out``. Its floating values are used only by methods that need θ0
            (the task-vector form).
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
            base, unreadable files, checkpoints from another θ0, an unknown method or a bad
            parameter); during the merge, on NaN/Inf
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
        plan.weighting,
        plan.base_specs,
        plan.branch_specs,
        mapped,
        plan.options.keep,
        plan.options.overrides,
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
            # Runs once every chunk before it is written: then the inputs may leave memory.
            done: Future = Future()
            done.set_result(functools.partial(terms.drop, name))
            window.append(done)
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
        if callable(piece):  # a tensor's last chunk is out
            piece()
            continue
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
        params=dict(w.params),
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
    overrides = plan.options.overrides or {}
    used = {
        _dtype_name(
            compute_dtype(
                overrides.get(name, plan.weighting), spec.torch_dtype, plan.out_dtypes[name]
            )
        )
        for name, spec in plan.base_specs.items()
        if spec.is_floating
    }
    return f"{' and '.join(sorted(used)) or 'nothing (no floating tensors)'}, rounded once"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version() -> str:
    try:
        return version("merit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _abs(path: str | Path) -> str:
    """Absolute, symlinks kept: the manifest stays checkable from any working directory."""
    return os.path.abspath(path)
