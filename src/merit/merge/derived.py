"""Models made from a run's trained ones by the streaming merge: the shrinkage control, a soup;
and which of θ0's tensors every merge copies unchanged (a vision-language θ0's frozen groups).

``run`` is a stage context (:class:`merit.graph.Context`): its θ0, config, cache and console.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from merit.merge.manifest import MANIFEST_FILE, MergeManifest
from merit.merge.safetensors_io import read_specs
from merit.merge.streaming import merge_checkpoints
from merit.vision import frozen_tensors


def frozen(run) -> frozenset[str]:
    """θ0's tensor names (as stored) outside the trainable groups: copied from θ0 by merges."""
    if run.base.trainable is None:
        return frozenset()
    specs, _problems = read_specs(run.base.dir)
    return frozen_tensors(specs, run.base.trainable)


def derived_model(
    run,
    out: Path,
    checkpoints: list[Path],
    weights: list[float],
    meta: dict,
    weights_from: str,
    method: str = "linear",
    scale: float = 1.0,
    params: dict | None = None,
    fit=None,
) -> MergeManifest:
    """A model made from trained ones — a shrinkage control θ0 + Σ w_k(θ_k − θ0)
    (``task_vector``), a soup Σ w_k θ_k (``linear``), any method with its ``params`` — streamed
    into ``out``; reused while ``meta`` (which records its inputs) is the same. ``fit``, for a
    fitted method, is called only when the model is made: it returns the per-tensor weightings
    and what to add to the manifest's metadata."""
    mp = out / MANIFEST_FILE
    if mp.is_file() and _same(MergeManifest.load(out).metadata, meta):
        return MergeManifest.load(out)
    if out.exists():
        shutil.rmtree(out)
    overrides, extra = fit() if fit is not None else ({}, {})
    with run.timed("merge"):
        return merge_checkpoints(
            run.base.dir,
            checkpoints,
            weights,
            out,
            method=method,
            scale=scale,
            params=params,
            overrides=overrides,
            dtype=run.cfg.merging.dtype,
            max_shard_bytes=run.cfg.merging.max_shard_bytes,
            metadata={**meta, **extra},
            weights_from=weights_from,
            keep=frozen(run),
            base_fingerprint=run.base.fingerprint,
            hash_cache=run.cache / "sha256",
            progress=run.progress,
        )


def _same(recorded: dict, meta: dict) -> bool:
    """Whether a manifest's metadata records ``meta`` (a fit may have added its results)."""
    return {k: recorded.get(k) for k in meta} == meta and set(meta) <= set(recorded)
