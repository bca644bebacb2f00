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
) -> MergeManifest:
    """A model made from trained ones — a shrinkage control θ0 + Σ w_k(θ_k − θ0)
    (``task_vector``), a soup Σ w_k θ_k (``linear``) — streamed into ``out``; reused while
    ``meta`` (which records its inputs) is the same."""
    mp = out / MANIFEST_FILE
    if mp.is_file() and (old := MergeManifest.load(out)).metadata == meta:
        return old
    if out.exists():
        shutil.rmtree(out)
    with run.timed("merge"):
        return merge_checkpoints(
            run.base.dir,
            checkpoints,
            weights,
            out,
            method=method,
            scale=scale,
            dtype=run.cfg.merging.dtype,
            max_shard_bytes=run.cfg.merging.max_shard_bytes,
            metadata=meta,
            weights_from=weights_from,
            keep=frozen(run),
            base_fingerprint=run.base.fingerprint,
            hash_cache=run.cache / "sha256",
            progress=run.progress,
        )
