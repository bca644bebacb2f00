"""The merge's planner: every check made, and every decision taken, before a byte is written.

:func:`plan_merge` checks the arguments (the method and its parameters among them: see
:mod:`merit.merge.methods`), every checkpoint's tensors against θ0's, and their provenance; it
fixes the method's coefficients and the output's shard layout in a :class:`MergePlan`, which
:mod:`merit.merge.streaming` then executes. Only the safetensors headers are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merit.hashing import HashCache, fingerprint_and_hashes
from merit.merge.arithmetic import Weighting, plan_weighting
from merit.merge.errors import MergeError, problems_error
from merit.merge.manifest import recorded_theta0
from merit.merge.safetensors_io import INDEX_FILE, SINGLE_FILE, TensorSpec, read_specs
from merit.merge.validation import header_problems, kept_problems, provenance_problems

_OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class MergeOptions:
    """How to merge, beyond what and into where: :func:`merge_checkpoints`' keywords.

    Attributes:
        method: a registered merge method (:mod:`merit.merge.methods`): ``linear`` is paper
            eq. 3, θ̄ = Σ_k w_k θ_k.
        params: the method's parameters (its defaults for those not given).
        scale: the ``scale`` parameter of a method that has one (task_vector's s).
        normalize: divide the weights by their sum first (else they are used as given).
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
        hash_cache: directory of a :class:`~merit.hashing.HashCache` for input hashes;
            ``None`` hashes anew.
        threads: worker threads for the arithmetic (default: the CPUs available, minus one for
            writing and hashing).
        progress: show a progress bar.
        overrides: per-tensor weightings (:func:`~merit.merge.arithmetic.plan_weighting`) that
            replace the method's for those tensors: learned per-layer coefficients, RegMean's
            closed form for linear layers.
    """

    method: str = "linear"
    params: Mapping[str, float] | None = None
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
    overrides: Mapping[str, Weighting] | None = None
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
    unknown = sorted(set(options.overrides or {}) - set(base_specs))
    if unknown:
        raise MergeError(f"a per-tensor weighting names {unknown[0]!r}, not a tensor of the base")
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
    weighting = plan_weighting(
        weights, method=o.method, scale=o.scale, normalize=o.normalize, params=o.params
    )
    if weighting.spec.fitted and not o.overrides:
        raise MergeError(
            f"method {weighting.method} is fitted on {weighting.spec.fitted}: it runs in a run's "
            f"merge stage (merit merge CONFIG with merging.method: {weighting.method})"
        )
    for w in (weighting, *(o.overrides or {}).values()):
        if w.spec.needs_base and not o.base_is_theta0:
            raise MergeError(f"method {w.method} needs θ0 as the base")
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
