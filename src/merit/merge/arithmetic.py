"""The merge's arithmetic: coefficients from weights, then Σ c·θ chunk by chunk.

Paper eq. 3, θ̄ = Σ_k w_k θ_k, and its task-vector form θ0 + s·Σ_k w_k (θ_k − θ0), are both
θ̄ = c0·θ0 + Σ_k c_k θ_k (:class:`Weighting`). :class:`MergeTerms` computes one chunk of one
output tensor at a time, in a wide accumulator rounded once, so memory is a few cache-sized
buffers whatever the number of checkpoints and the size of the model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from merit.merge.errors import MergeError
from merit.merge.safetensors_io import MappedFiles, TensorSpec

METHODS = ("linear", "task_vector")

# Elements per work item. The fp32 accumulator and scratch of one chunk (2 MiB) stay in L2, so
# each input element crosses memory once (as bf16) instead of three times as fp32: several times
# faster than whole-tensor arithmetic, and memory no longer grows with the largest tensor.
_CHUNK = 1 << 18
# A base coefficient 1 − s·Σw this small is rounding noise in decimal weights (0.4 + 0.3 + 0.2
# + 0.1 ≠ 1 in binary): dropping it makes the task-vector form with s = 1 and Σw = 1 bitwise the
# linear merge, as it is mathematically.
_ZERO_COEFFICIENT = 1e-12


@dataclass(frozen=True)
class Weighting:
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


def plan_weighting(
    weights: Sequence[float],
    *,
    method: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
) -> Weighting:
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
        return Weighting(method, given, used, normalize, None, 0.0, used)
    coefficients = tuple(scale * w for w in used)
    c0 = math.fsum([1.0, *(-c for c in coefficients)])
    if abs(c0) <= _ZERO_COEFFICIENT:
        c0 = 0.0
    return Weighting(method, given, used, normalize, float(scale), c0, coefficients)


def accumulate_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """Wider than input and output so that the single final rounding is the only one that
    matters: fp32 for 8/16-bit floats, fp64 when fp32 is involved (an fp32 sum of K identical
    fp32 tensors with weights summing to 1 is not bitwise the input)."""
    return torch.float64 if max(in_dtype.itemsize, out_dtype.itemsize) >= 4 else torch.float32


class MergeTerms:
    """The summands of each output tensor, and the arithmetic on one chunk of it."""

    def __init__(
        self,
        weighting: Weighting,
        base_specs: dict[str, TensorSpec],
        branch_specs: Sequence[dict[str, TensorSpec]],
        mapped: MappedFiles,
        keep: frozenset[str] = frozenset(),
    ) -> None:
        self.weighting, self.base_specs, self.branch_specs = weighting, base_specs, branch_specs
        self.mapped = mapped
        self.keep = keep
        self._local = threading.local()
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._free_lock = threading.Lock()

    def sources(self, name: str) -> list[tuple[TensorSpec, float]]:
        """(spec, coefficient) of each summand of tensor ``name``, θ0 first if it takes part."""
        w = self.weighting
        terms = [(specs[name], c) for specs, c in zip(self.branch_specs, w.coefficients)]
        if w.base_coefficient != 0.0:
            terms.insert(0, (self.base_specs[name], w.base_coefficient))
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
        buffer = self._output_buffer(out_dtype)
        merged = buffer[:n].copy_(acc)  # the one rounding (to nearest even, as .to())
        # NaN/Inf anywhere in the sum reaches the output, so one check of the output covers both
        # non-finite inputs and overflow when rounding to a narrower dtype; a finite sum proves
        # every element finite at a fraction of the cost of isfinite().all().
        if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
            raise self._non_finite(name, start, stop, out_dtype)
        return merged, buffer

    def _non_finite(self, name: str, start: int, stop: int, out_dtype: torch.dtype) -> MergeError:
        """The inputs with NaN/Inf in the chunk, or else the overflow of the output dtype."""
        culprits = [
            str(spec.file)
            for spec, _ in self.sources(name)
            if not bool(torch.isfinite(self.mapped.tensor(spec)[start:stop]).all())
        ]
        if culprits:
            return MergeError(f"NaN/Inf in tensor {name!r} of {', '.join(culprits)}")
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
        views = [(self.mapped.tensor(spec), c) for spec, c in self.sources(name)]
        for start in range(0, base.numel, _CHUNK):
            stop = min(base.numel, start + _CHUNK)
            yield pool.submit(self.chunk, name, views, start, stop, out_dtype)
