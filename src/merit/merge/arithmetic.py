"""The merge's arithmetic: a method's plan from the weights, then each output tensor chunk by chunk.

Paper eq. 3, θ̄ = Σ_k w_k θ_k, and its task-vector form θ0 + s·Σ_k w_k (θ_k − θ0), are both
θ̄ = c0·θ0 + Σ_k c_k θ_k: methods that say so (:mod:`merit.merge.methods`) give the coefficients
and run on a fused multiply-add executor in a wide accumulator rounded once; any other method
gives a function of float32 chunks of θ0 and the K inputs. :class:`MergeTerms` computes one chunk
of one output tensor at a time, so memory is a few cache-sized buffers whatever the number of
checkpoints and the size of the model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from merit.merge.errors import MergeError
from merit.merge.methods import MergeMethod, get_method
from merit.merge.safetensors_io import MappedFiles, TensorSpec

# Elements per work item. The fp32 accumulator and scratch of one chunk (2 MiB) stay in L2, so
# each input element crosses memory once (as bf16) instead of three times as fp32: several times
# faster than whole-tensor arithmetic, and memory no longer grows with the largest tensor.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class Weighting:
    """What is merged, and how: the method, its resolved parameters, the weights, and for a
    linear-combination method the coefficients of θ̄ = c0·θ0 + Σ_k c_k θ_k (c0 = 0 for the
    linear merge). A per-tensor method records c0 = 0 and its weights as the coefficients."""

    method: str
    weights_given: tuple[float, ...]
    weights: tuple[float, ...]
    normalized: bool
    scale: float | None
    base_coefficient: float
    coefficients: tuple[float, ...]
    params: Mapping[str, float]
    spec: MergeMethod

    @property
    def formula(self) -> str:
        return self.spec.formula

    @property
    def linear(self) -> bool:
        """Whether the method is a linear combination (run by the fused multiply-add path)."""
        return self.spec.coefficients is not None


def plan_weighting(
    weights: Sequence[float],
    *,
    method: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
    params: Mapping[str, float] | None = None,
) -> Weighting:
    """Turn weights into what the registered ``method`` needs, checked before any read.

    ``normalize`` divides the weights by their sum first. ``scale`` is the ``scale`` parameter of
    a method that has one (``params`` may give it too); the task-vector form
    θ0 + s·Σ w_k (θ_k − θ0) is summed as (1 − s·Σw)·θ0 + Σ (s·w_k)·θ_k: with s = 1 and weights
    summing to one the θ0 term vanishes and it is bitwise the linear merge.
    """
    given = tuple(float(w) for w in weights)
    if not given:
        raise MergeError("no checkpoints to merge")
    spec = get_method(method)
    if not all(math.isfinite(w) for w in given):
        raise MergeError(f"weights must be finite, got {list(given)}")
    total = math.fsum(given)
    if normalize:
        if total == 0:
            raise MergeError(f"cannot normalise weights that sum to 0: {list(given)}")
        used = tuple(w / total for w in given)
    else:
        used = given
    resolved = spec.validate(used, _with_scale(spec, scale, params))
    c0, coefficients = spec.coefficients(used, resolved) if spec.coefficients else (0.0, used)
    return Weighting(
        method=spec.name,
        weights_given=given,
        weights=used,
        normalized=normalize,
        scale=resolved.get("scale"),
        base_coefficient=float(c0),
        coefficients=tuple(float(c) for c in coefficients),
        params=resolved,
        spec=spec,
    )


def _with_scale(
    spec: MergeMethod, scale: float, params: Mapping[str, float] | None
) -> dict[str, float]:
    """``params`` plus the ``scale`` keyword, for a method with a scale; a scale other than 1 for
    a method without one is refused rather than ignored."""
    params = dict(params or {})
    if any(p.name == "scale" for p in spec.params):
        if "scale" in params and scale != 1.0 and params["scale"] != scale:
            raise MergeError(f"scale given twice: {scale:g} and {params['scale']:g}")
        params.setdefault("scale", scale)
    elif scale != 1.0:
        raise MergeError(f"method {spec.name} has no scale (got s = {scale:g})")
    return params


def accumulate_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """Wider than input and output so that the single final rounding is the only one that
    matters: fp32 for 8/16-bit floats, fp64 when fp32 is involved (an fp32 sum of K identical
    fp32 tensors with weights summing to 1 is not bitwise the input)."""
    return torch.float64 if max(in_dtype.itemsize, out_dtype.itemsize) >= 4 else torch.float32


def compute_dtype(
    weighting: Weighting, in_dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.dtype:
    """The dtype a method's arithmetic runs in: the accumulator's for a linear combination,
    float32 (the per-tensor functions' contract) otherwise."""
    return accumulate_dtype(in_dtype, out_dtype) if weighting.linear else torch.float32


class TensorInputs(NamedTuple):
    """The whole flat input tensors of one output tensor, as stored, for a per-tensor method:
    θ0 (``None`` unless the method needs it), the K checkpoints', and the future of the
    method's whole-tensor statistics (``None`` if it has none), and the tensor's weighting."""

    theta0: torch.Tensor | None
    thetas: list[torch.Tensor]
    stats: Future | None
    weighting: Weighting


class MergeTerms:
    """The inputs of each output tensor, and the arithmetic on one chunk of it."""

    def __init__(
        self,
        weighting: Weighting,
        base_specs: dict[str, TensorSpec],
        branch_specs: Sequence[dict[str, TensorSpec]],
        mapped: MappedFiles,
        keep: frozenset[str] = frozenset(),
        overrides: Mapping[str, Weighting] | None = None,
    ) -> None:
        self.weighting, self.base_specs, self.branch_specs = weighting, base_specs, branch_specs
        self.mapped = mapped
        self.keep = keep
        self.overrides = dict(overrides or {})
        self._local = threading.local()
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._free_lock = threading.Lock()

    def weighting_for(self, name: str) -> Weighting:
        """How tensor ``name`` merges: its own weighting where one is given (per-layer learned
        coefficients, RegMean's closed form), else the merge's."""
        return self.overrides.get(name, self.weighting)

    def inputs(self, name: str) -> list[TensorSpec]:
        """The stored tensors that tensor ``name`` is computed from, θ0 first if it takes part
        (read only where its coefficient is not zero, for a linear combination)."""
        w = self.weighting_for(name)
        uses_base = w.base_coefficient != 0.0 if w.linear else w.spec.needs_base
        branches = [specs[name] for specs in self.branch_specs]
        return [self.base_specs[name], *branches] if uses_base else branches

    def drop(self, name: str) -> None:
        """Tensor ``name`` is written: its inputs' mapped pages may leave memory."""
        for spec in (self.base_specs[name], *(specs[name] for specs in self.branch_specs)):
            self.mapped.drop(spec)

    def sources(self, name: str) -> list[tuple[TensorSpec, float]]:
        """(spec, coefficient) of each summand of a linear combination, θ0 first if it takes
        part."""
        w = self.weighting_for(name)
        coefficients = [w.base_coefficient] if w.base_coefficient != 0.0 else []
        return list(zip(self.inputs(name), [*coefficients, *w.coefficients]))

    def _buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Per worker thread, reused for every chunk: copy_ into a preallocated buffer is several
        # times faster than converting every input into a fresh tensor.
        buffers = self._local.__dict__.setdefault("buffers", {})
        if dtype not in buffers:
            buffers[dtype] = (torch.empty(_CHUNK, dtype=dtype), torch.empty(_CHUNK, dtype=dtype))
        return buffers[dtype]

    def _float32_buffers(self, count: int) -> list[torch.Tensor]:
        # Per worker thread, as _buffers: one float32 chunk per input of a per-tensor method.
        buffers = self._local.__dict__.setdefault("float32", [])
        while len(buffers) < count:
            buffers.append(torch.empty(_CHUNK, dtype=torch.float32))
        return buffers[:count]

    def chunk(
        self,
        name: str,
        views: list[tuple[torch.Tensor, float]] | TensorInputs,
        start: int,
        stop: int,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements [start, stop) of the merged tensor, computed wide and rounded once; and the
        buffer holding them, to :meth:`recycle` once written. ``views`` are the (input,
        coefficient) pairs of a linear combination, or a per-tensor method's inputs."""
        if isinstance(views, TensorInputs):
            wide = self._apply(views, start, stop)
        else:
            wide = self._combine(views, start, stop, out_dtype)
        buffer = self._output_buffer(out_dtype)
        merged = buffer[: stop - start].copy_(wide)  # the one rounding (to nearest even)
        # NaN/Inf anywhere in the sum reaches the output, so one check of the output covers both
        # non-finite inputs and overflow when rounding to a narrower dtype; a finite sum proves
        # every element finite at a fraction of the cost of isfinite().all().
        if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
            raise self._non_finite(name, start, stop, out_dtype)
        return merged, buffer

    def _combine(
        self,
        views: list[tuple[torch.Tensor, float]],
        start: int,
        stop: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Σ c·θ over elements [start, stop), in the wide accumulator."""
        acc_full, scratch_full = self._buffers(accumulate_dtype(views[0][0].dtype, out_dtype))
        n = stop - start
        acc, scratch = acc_full[:n], scratch_full[:n]
        acc.zero_()
        for view, coefficient in views:
            # Widen into the scratch buffer, then one fused multiply-add: exactly mergekit's
            # `addcmul_` from a zero accumulator (so the same bits), without its fp32 copies of
            # whole tensors.
            scratch.copy_(view[start:stop])
            acc.add_(scratch, alpha=coefficient)
        return acc

    def _apply(self, inputs: TensorInputs, start: int, stop: int) -> torch.Tensor:
        """A per-tensor method on elements [start, stop) of its inputs, widened to float32."""
        w, n = inputs.weighting, stop - start
        stored = [*([inputs.theta0] if inputs.theta0 is not None else []), *inputs.thetas]
        wide = [
            b[:n].copy_(v[start:stop]) for b, v in zip(self._float32_buffers(len(stored)), stored)
        ]
        theta0 = wide.pop(0) if inputs.theta0 is not None else None
        stats = inputs.stats.result() if inputs.stats is not None else None
        assert w.spec.merge is not None  # a per-tensor method, by TensorInputs
        where = {"start": start} if w.spec.chunk_offset else {}
        merged = w.spec.merge(theta0, wide, w.weights, w.params, stats, **where)
        if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != (n,):
            got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
            raise MergeError(f"method {w.method} returned {got} for a chunk of {n} elements")
        return merged

    def _statistics(self, inputs: TensorInputs) -> Any:
        w = inputs.weighting
        assert w.spec.statistics is not None
        return w.spec.statistics(inputs.theta0, inputs.thetas, w.weights, w.params)

    def _non_finite(self, name: str, start: int, stop: int, out_dtype: torch.dtype) -> MergeError:
        """The inputs with NaN/Inf in the chunk, or else the overflow of the output dtype."""
        culprits = [
            str(spec.file)
            for spec in self.inputs(name)
            if not bool(torch.isfinite(self.mapped.tensor(spec)[start:stop]).all())
        ]
        if culprits:
            return MergeError(f"NaN/Inf in tensor {name!r} of {', '.join(culprits)}")
        if not (w := self.weighting_for(name)).linear:
            return MergeError(f"tensor {name!r}: method {w.method} made NaN/Inf")
        return MergeError(f"tensor {name!r}: merged values overflow {out_dtype}")

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

    def pieces(self, name: str, out_dtype: torch.dtype, pool: Executor) -> Iterator[Future]:
        """Futures of the output bytes of tensor ``name``, in order, one per chunk."""
        base = self.base_specs[name]
        if not base.is_floating or name in self.keep:
            # Validated identical in every branch: θ0's bytes, as stored (cast once for another
            # output dtype). A frozen parameter too: Σ w_k θ0 need not round back to θ0.
            done: Future = Future()
            if base.is_floating and out_dtype != base.torch_dtype:
                cast = self.mapped.tensor(base).to(out_dtype)
                done.set_result(cast.view(torch.uint8).numpy())
            else:
                done.set_result(self.mapped.raw(base))
            yield done
            return
        views = self._views(name, pool)
        for start in range(0, base.numel, _CHUNK):
            stop = min(base.numel, start + _CHUNK)
            yield pool.submit(self.chunk, name, views, start, stop, out_dtype)

    def _views(self, name: str, pool: Executor) -> list[tuple[torch.Tensor, float]] | TensorInputs:
        """What each chunk of tensor ``name`` is computed from: the memory-mapped inputs and
        their coefficients, or a per-tensor method's inputs with its statistics under way."""
        w = self.weighting_for(name)
        if w.linear:
            return [(self.mapped.tensor(spec), c) for spec, c in self.sources(name)]
        stored = [self.mapped.tensor(spec) for spec in self.inputs(name)]
        theta0 = stored.pop(0) if w.spec.needs_base else None
        inputs = TensorInputs(theta0, stored, None, w)
        if w.spec.statistics is None:
            return inputs
        # Submitted before the tensor's chunks, so a worker takes it first (the pool is FIFO)
        # and the chunks waiting on it cannot starve it.
        return inputs._replace(stats=pool.submit(self._statistics, inputs))
