"""Merge methods: how K fine-tuned checkpoints θ_1..θ_K (and θ0) become one model.

Each method is a :class:`MergeMethod` registered in :data:`METHODS` by its own module in this
package; the registry imports every module here on first use, so a new built-in method is one
new file (a plugin or test registers its own by importing a module that calls
``METHODS.register``). The streaming engine (:mod:`merit.merge.streaming`) runs any of them by
name, chunk by chunk, in bounded memory.

A method computes each output tensor in one of two ways:

* ``coefficients(weights, params) -> (c0, (c_1, ..., c_K))``: the merge is the linear
  combination θ̄ = c0·θ0 + Σ_k c_k θ_k, run by the engine's fused multiply-add executor in a wide
  accumulator rounded once (mergekit's arithmetic, bit for bit). Paper eq. 3, θ̄ = Σ_k w_k θ_k,
  and its task-vector form are such methods.
* ``merge(theta0, thetas, weights, params, stats) -> Tensor``: any element-wise function of θ0
  (``None`` unless ``needs_base``) and the K inputs, called on flat float32 chunks of one tensor
  (its inputs are scratch buffers it may overwrite) and returning the merged chunk. A method
  that needs statistics of the whole tensor first (a magnitude threshold, a sign election)
  also gives ``statistics(theta0, thetas, weights, params)``: called once per tensor, before
  its chunks, on the whole flat tensors as stored (memory-mapped, not widened: widen one at a
  time to keep memory bounded), costing one extra read of that tensor; its result is passed to
  ``merge`` as ``stats``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merit.errors import ConfigError
from merit.merge.errors import MergeError
from merit.registry import Registry

Coefficients = Callable[[tuple[float, ...], Mapping[str, float]], tuple[float, tuple[float, ...]]]
TensorMerge = Callable[
    [torch.Tensor | None, list[torch.Tensor], tuple[float, ...], Mapping[str, float], Any],
    torch.Tensor,
]
TensorStatistics = Callable[
    [torch.Tensor | None, Sequence[torch.Tensor], tuple[float, ...], Mapping[str, float]], Any
]
Check = Callable[[tuple[float, ...], Mapping[str, float]], None]


@dataclass(frozen=True)
class Param:
    """A numeric parameter of a method (e.g. the task-vector scale s), with its default."""

    name: str
    default: float
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it needs, its parameters, and how it computes a tensor.

    Attributes:
        name: the name ``--method`` and ``merge_checkpoints(method=...)`` take.
        formula: what it computes, recorded in the manifest and model card.
        help: one line for ``--help``.
        needs_base: whether θ0 takes part (then the base must be θ0, not just structure).
        params: its parameters; ``merge_checkpoints`` and the CLI pass only these.
        check: validation beyond "every parameter is a finite number": raises
            :class:`MergeError` (or :class:`~merit.errors.ConfigError`) in one line.
        coefficients: the linear-combination fast path (see the module docstring).
        merge: the per-tensor path, used when ``coefficients`` is ``None``.
        statistics: whole-tensor statistics for ``merge``, computed once per tensor.
        chunk_offset: ``merge`` also takes ``start=``, the chunk's first element in the tensor
            (element-wise randomness that must not depend on how the tensor is cut).
        fitted: what the method is fitted on, for one fitted to data (RegMean's Grams, learned
            coefficients): such a method runs only in a run's merge stage, which fits it and
            passes per-tensor weightings (``overrides``) to the engine.
        order: place in listings (``--help``, error messages).
    """

    name: str
    formula: str
    help: str = ""
    needs_base: bool = False
    params: tuple[Param, ...] = ()
    check: Check | None = None
    coefficients: Coefficients | None = None
    merge: TensorMerge | None = None
    statistics: TensorStatistics | None = None
    chunk_offset: bool = False
    fitted: str = ""
    order: int = 0

    def __post_init__(self) -> None:
        if (self.coefficients is None) == (self.merge is None):
            raise ValueError(f"merge method {self.name!r}: give coefficients or merge, not both")
        if self.statistics is not None and self.merge is None:
            raise ValueError(f"merge method {self.name!r}: statistics are for a merge function")

    def validate(
        self, weights: Sequence[float], params: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Every parameter resolved (given, else its default) and checked; :class:`MergeError`
        in one line for an unknown parameter, a non-finite value, or what ``check`` refuses."""
        given = dict(params or {})
        known = {p.name: p.default for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise MergeError(f"method {self.name} has no parameter {unknown[0]!r} ({takes})")
        resolved = {name: float(given.get(name, default)) for name, default in known.items()}
        for name, value in resolved.items():
            if not math.isfinite(value):
                raise MergeError(f"{name} must be finite, got {value}")
        if self.check is not None:
            try:
                self.check(tuple(float(w) for w in weights), resolved)
            except ConfigError as err:  # a check may raise either: the merge reports MergeError
                raise MergeError(str(err)) from None
        return resolved


METHODS: Registry[MergeMethod] = Registry("merge method", "merit.merge.methods")


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; :class:`MergeError` listing the known ones otherwise."""
    try:
        return METHODS.get(name)
    except ConfigError as err:
        raise MergeError(str(err)) from None
