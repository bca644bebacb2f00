"""Representative gradients g_t at θ0 (paper §3.1), compressed by a CountSketch.

The sketch itself (hashing, folding) is :mod:`merit.calibrate.countsketch`; this module runs the
model to get the gradients it sketches, and records what makes two sketches comparable.

Calibration holds a full gradient only where it fits. Accumulate-then-sketch lets autograd sum
every micro-batch's gradient in ``.grad`` and sketches it once per part; it is the cheaper of the
two (4.4% of calibration time against 15% on a 7B model on an H200, docs/benchmarks.md) and its
|g|² is exact. Streaming (``GradientStream``) sketches each parameter's gradient in a
post-accumulate-grad hook as soon as autograd has accumulated it and frees it, so a big model
never holds a full fp32 gradient; its |g|² is the sketch's estimate |S g|². ``"auto"`` (the
default) accumulates when the gradient takes at most half of the free memory
(``resolve_streaming``). Each dataset's calibration examples are also cut into a few disjoint
parts whose sketches are kept (folded to fewer buckets): by linearity their token-weighted mean
is the dataset's sketch, and resampling them measures how much the plan depends on the sample
drawn.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from merit.calibrate import memory

# The sketch's names, imported from here by the stages, the tests and the benchmarks.
from merit.calibrate.countsketch import (  # noqa: F401
    CHUNK,
    GROUP,
    CountSketch,
    SketchSpec,
    fold,
    part_dim,
)
from merit.lm import Encoded, pad_batch, token_nll_sum, trainable_parameters

LOSS_DEFINITION = "mean NLL over answer tokens (chat template; prompt tokens masked)"


@dataclass
class Calibration:
    """Sketch of the mean answer-token gradient of one dataset, and of each of its parts.

    ``parts`` holds, for a few disjoint parts ("micro-batches") of the calibration examples, the
    sketch of each part's own token-mean gradient, folded to ``part_dim`` buckets. The sketch is
    linear, so Σ_m (n_m / N) · part_m is the dataset's sketch (folded): planning resamples parts
    to estimate how much the plan would move with another draw of calibration samples.
    """

    sketch: torch.Tensor
    sq_norm: float
    loss: float
    tokens: int
    parts: torch.Tensor | None = None  # M × part_dim
    part_tokens: list[int] = field(default_factory=list)
    sq_norm_exact: bool = True  # False when streamed: |S g|², an unbiased estimate of |g|²
    sketch_seconds: float = 0.0  # time spent sketching (for benchmarks)
    mode: Literal["accumulate", "stream"] = "accumulate"  # how the gradient was sketched


def split_parts(n: int, parts: int, seed: int, name: str) -> list[list[int]]:
    """Disjoint parts of ``n`` examples, a pure function of (seed, dataset name, n).

    A dataset's parts do not depend on which other datasets are calibrated with it, so a dataset
    added later gets exactly the parts it would have had in a run planned from scratch.
    """
    order = list(range(n))
    random.Random(f"{seed}/{name}/parts").shuffle(order)
    m = max(1, min(parts, n))
    return [sorted(order[i::m]) for i in range(m)]


# -- accumulate or stream -------------------------------------------------------------------------
Streaming = bool | Literal["auto"]
# Accumulate only when the gradient takes at most this share of the free memory: the backward
# pass's activations and the allocator's fragmentation need the rest.
ACCUMULATE_SHARE = 0.5


def accumulate_bytes(model) -> int:
    """Memory accumulate-then-sketch holds beyond what streaming does: a gradient of every
    trainable parameter, counted in fp32 whatever the model's dtype, plus one fp32 copy of the
    largest parameter (|g|² and the sketch's chunks convert one parameter at a time)."""
    sizes = [p.numel() for _, p in trainable_parameters(model)]
    return 4 * (sum(sizes) + max(sizes, default=0))


def resolve_streaming(
    streaming: Streaming,
    model,
    free: int | None = None,
    share: float = ACCUMULATE_SHARE,
) -> bool:
    """Whether to stream: ``streaming`` itself when a bool; for ``"auto"``, stream unless the
    full gradient (``accumulate_bytes``) fits in ``share`` of the ``free`` bytes (measured on the
    model's device when not given; unknown free memory streams, the choice that needs none)."""
    if isinstance(streaming, bool):
        return streaming
    if streaming != "auto":
        raise ValueError(f"streaming must be true, false or 'auto', not {streaming!r}")
    if free is None:
        free = memory.free_memory(next(model.parameters()).device)
    return free is None or accumulate_bytes(model) > share * free


class GradientStream:
    """Sketch each parameter's gradient as soon as autograd has accumulated it, then free it.

    A post-accumulate-grad hook per parameter adds the gradient's sketch into ``target`` (d
    floats) and drops ``.grad``: calibration holds the weights, the activations, one parameter's
    gradient and d floats, never a full copy of the gradient (what a big model cannot afford).

    The price is |g|². g = Σ_b g_b sums the backward passes b, and |Σ_b g_b|² holds the cross
    terms <g_b, g_b'> of passes that never coexist: a hook sees parameter p's share of one pass
    and must forget it before the next. Exact |g|² therefore needs Σ_b g_b kept per coordinate,
    a full gradient; computing the norm of a vector given as a stream of additive updates exactly
    takes memory linear in its dimension (Alon, Matias & Szegedy 1996). Streaming reports |S g|²
    (unbiased, relative error ~ sqrt(2/d)); ``"auto"`` accumulates, and so is exact, wherever
    the gradient fits.
    """

    def __init__(self, model, sketcher: CountSketch):
        self.params = trainable_parameters(model)
        self.sketcher = sketcher
        self.target: torch.Tensor | None = None
        self.seconds = 0.0
        self._handles: list = []

    def _hook(self, name: str):
        def hook(p: torch.nn.Parameter) -> None:
            t = time.perf_counter()
            if self.target is not None:
                self.sketcher.add(self.target, name, p.grad)
            p.grad = None
            self.seconds += time.perf_counter() - t

        return hook

    def __enter__(self) -> GradientStream:
        for name, p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class _Pass:
    """What one calibration pass over a dataset's parts needs."""

    model: object
    examples: Sequence[Encoded]
    sketcher: CountSketch
    batch_size: int
    pad_id: int
    on_batch: Callable[[], None] | None
    device: torch.device

    def backward(self, part: Sequence[int], scale: float) -> float:
        """Backward of Σ NLL / ``scale`` over the part's examples, batched by length; returns
        the summed NLL (gradients land in ``.grad`` or in the stream's hooks)."""
        order = sorted(part, key=lambda i: len(self.examples[i].input_ids))
        loss = 0.0
        for s in range(0, len(order), self.batch_size):
            batch = [self.examples[i] for i in order[s : s + self.batch_size]]
            nll = token_nll_sum(self.model, pad_batch(batch, self.pad_id, self.device))
            (nll / scale).backward()
            loss += float(nll.detach())
            if self.on_batch:
                self.on_batch()
        return loss

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.sketcher.spec.dim, dtype=torch.float32, device=self.device)


def _accumulated(ps: _Pass, parts, part_tokens) -> tuple[torch.Tensor, list, float, float, float]:
    """The dataset's token mean accumulates in ``.grad`` (scaled by 1 / total tokens); its
    running total is sketched after each part, whose own sketch is the difference (linearity).
    Returns (sketch, part sketches, exact |g|², summed NLL, sketch seconds)."""
    total = sum(part_tokens)
    prev, sketches, loss, seconds = ps.zeros(), [], 0.0, 0.0
    for p, n_p in zip(parts, part_tokens):
        loss += ps.backward(p, total)
        t = time.perf_counter()
        acc = ps.zeros()
        for name, q in trainable_parameters(ps.model):
            if q.grad is not None:
                ps.sketcher.add(acc, name, q.grad)
        seconds += time.perf_counter() - t
        sketches.append((acc - prev) * (total / max(n_p, 1)))
        prev = acc
    sq = sum(
        float(q.grad.detach().float().pow(2).sum())
        for _, q in trainable_parameters(ps.model)
        if q.grad is not None
    )
    return prev, sketches, sq, loss, seconds


def _streamed(ps: _Pass, parts, part_tokens) -> tuple[torch.Tensor, list, float, float, float]:
    """Each part's token mean is sketched by the hooks as autograd produces it (no ``.grad``
    survives a pass); the dataset's sketch is their token-weighted mean, |g|² its |S g|²."""
    total = sum(part_tokens)
    out, sketches, loss = ps.zeros(), [], 0.0
    with GradientStream(ps.model, ps.sketcher) as stream:
        for p, n_p in zip(parts, part_tokens):
            stream.target = ps.zeros()
            loss += ps.backward(p, max(n_p, 1))
            out += stream.target * (n_p / total)
            sketches.append(stream.target)
    return out, sketches, float(out.double().pow(2).sum()), loss, stream.seconds


def mean_gradient_sketch(
    model,
    examples: Sequence[Encoded],
    sketcher: CountSketch,
    batch_size: int,
    pad_id: int,
    on_batch: Callable[[], None] | None = None,
    parts: Sequence[Sequence[int]] | None = None,
    fold_dim: int | None = None,
    streaming: Streaming = False,
) -> Calibration:
    """g_t = ∇θ mean answer-token NLL over ``examples`` at the model's current weights, sketched.

    ``parts`` (default: one part, every example) are disjoint index lists; each part's own
    token-mean gradient is sketched too (folded to ``fold_dim`` buckets). ``streaming``: False
    accumulates then sketches (|g|² exact), True streams (|g|² estimated, see
    ``GradientStream``), ``"auto"`` picks by free memory (``resolve_streaming``).
    """
    stream = resolve_streaming(streaming, model)
    parts = [list(range(len(examples)))] if parts is None else [list(p) for p in parts]
    part_tokens = [sum(examples[i].answer_tokens for i in p) for p in parts]
    total = sum(part_tokens)
    if total == 0:
        raise ValueError("calibration examples have no answer tokens")
    device = next(model.parameters()).device
    ps = _Pass(model, examples, sketcher, batch_size, pad_id, on_batch, device)
    model.zero_grad(set_to_none=True)
    try:
        out, sketches, sq, loss, seconds = (_streamed if stream else _accumulated)(
            ps, parts, part_tokens
        )
    finally:
        model.zero_grad(set_to_none=True)
    return Calibration(
        out.cpu(),
        sq,
        loss / total,
        total,
        parts=torch.stack([fold(x, fold_dim or x.numel()).cpu() for x in sketches]),
        part_tokens=part_tokens,
        sq_norm_exact=not stream,
        sketch_seconds=seconds,
        mode="stream" if stream else "accumulate",
    )


def calibrate_model(
    model,
    datasets: dict[str, Sequence[Encoded]],
    spec: SketchSpec,
    batch_size: int,
    pad_id: int,
    progress: bool = True,
    parts: int = 1,
    fold_dim: int | None = None,
    streaming: Streaming = "auto",
) -> dict[str, Calibration]:
    """Sketched representative gradient of each dataset at θ0 (the model's current weights).

    Each dataset's calibration examples are cut into ``parts`` disjoint parts (seeded by the
    sketch seed and the dataset name), each part's gradient sketched too. ``"auto"`` streaming
    is decided once, before the first dataset, and recorded in every ``Calibration.mode``.
    """
    model.eval()  # no dropout: g_t is the gradient of the loss, not of a random sub-network
    stream = resolve_streaming(streaming, model)
    sketcher = CountSketch(spec)
    n_batches = sum(
        sum(math.ceil(len(p) / batch_size) for p in split_parts(len(v), parts, spec.seed, k))
        for k, v in datasets.items()
    )
    bar = tqdm(total=n_batches, desc="calibrate", unit="batch", disable=not progress)
    out = {}
    for name, examples in datasets.items():
        out[name] = mean_gradient_sketch(
            model,
            examples,
            sketcher,
            batch_size,
            pad_id,
            bar.update,
            parts=split_parts(len(examples), parts, spec.seed, name),
            fold_dim=fold_dim,
            streaming=stream,
        )
    bar.close()
    return out


def parameter_layout(model) -> str:
    """sha256 of the trainable parameters' names and shapes: sketches hash coordinates by
    (name, flat index), so two sketches are comparable only over the same layout."""
    h = hashlib.sha256()
    for name, p in trainable_parameters(model):
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
    return h.hexdigest()


class SpecMismatch(ValueError):
    """Sketches made with another spec cannot be compared with these."""


# What each recorded field of a calibration spec means, for error messages.
SPEC_FIELDS = {
    "dim": "sketch dimension d (calibration.sketch_dim)",
    "seed": "sketch seed (calibration.seed)",
    "hash": "hash function",
    "layout": "parameter layout (names and shapes)",
    "base_fingerprint": "θ0 fingerprint",
    "loss": "loss definition",
    "max_length": "max_length (model.max_length)",
    "parts": "micro-batches per dataset (calibration.microbatches)",
    "part_dim": "micro-batch sketch buckets (calibration.microbatch_dim)",
}


def check_spec(recorded: dict, current: dict) -> None:
    """Refuse sketches made with another spec, naming every field that differs."""
    bad = []
    for key, label in SPEC_FIELDS.items():
        if recorded.get(key) != current.get(key):
            bad.append(f"{key} ({label}): {recorded.get(key)!r} != {current.get(key)!r}")
    if bad:
        raise SpecMismatch(
            "the existing sketches were made with a different spec, so new datasets cannot be "
            "added to them: " + "; ".join(bad)
        )


def spec_dict(spec: SketchSpec, **fields) -> dict:
    """The recorded spec: what must match for sketches to be compared (see ``SPEC_FIELDS``)."""
    return {
        **asdict(spec),
        "hash": f"chunked ({CHUNK}): splitmix64(blake2b(seed, name) + chunk·φ), τ(seed)",
        "loss": LOSS_DEFINITION,
        **fields,
    }
