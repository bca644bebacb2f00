"""Representative gradients g_t at θ0 (paper §3.1), compressed by a CountSketch.

The paper keeps 1 coordinate in 5; a CountSketch keeps every coordinate, hashed into d signed
buckets, so <S a, S b> is an unbiased estimate of <a, b> with variance ≤ |a|²|b|²/d whatever the
model size (Charikar et al. 2002). Each coordinate's bucket and sign are a pure function of
(seed, parameter name, flat index): no index table is stored, and the sketch does not depend on
the order in which parameters are visited nor on how a parameter is cut into slices. Buckets are
hashed per chunk of 2^16 coordinates, signs per coordinate (``CountSketch``), so sketching is a
few contiguous multiply-adds per chunk.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from merit.lm import Encoded, pad_batch, token_nll_sum, trainable_parameters

# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
LOSS_DEFINITION = "mean NLL over answer tokens (chat template; prompt tokens masked)"


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # splitmix64 finaliser: int64 multiplication wraps modulo 2^64, which is what we want.
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def _name_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# Coordinates per chunk: a chunk is added with (at most) two contiguous fused multiply-adds, so
# the per-chunk Python cost is amortised over 2^16 coordinates and its 256 KiB of sign window
# stays in cache. Part of the sketch's definition: changing it changes every sketch.
CHUNK = 2**16
GROUP = 64  # chunks per index_add_ on the batched path (~50 MiB of temporaries)


@dataclass(frozen=True)
class SketchSpec:
    """Everything that must match for two sketches to be comparable."""

    dim: int
    seed: int


class CountSketch:
    """Linear map R^n -> R^d; ``add(out, name, values, offset)`` adds a slice of a parameter.

    A chunked CountSketch. Flat coordinate i of parameter ``name`` lies in chunk c = i // CHUNK at
    position k = i % CHUNK. Each chunk has a hashed sign σ_c, bucket shift s_c and sign-window
    offset u_c (splitmix64 of (seed, name, c)); the coordinate goes to bucket (k + s_c) mod d
    with sign σ_c · τ[u_c + k], τ being 2·CHUNK seeded random signs. Any two distinct coordinates
    that share a bucket carry independent signs (σ_c σ_c' across chunks, τ[u+k] τ[u+k'] with
    k ≠ k' within one), so <S a, S b> is unbiased with the variance of a CountSketch,
    ≲ |a|²|b|²/d (Charikar et al. 2002) — but a chunk lands in contiguous buckets, so it is added
    by two ``addcmul_`` over contiguous memory instead of a scatter through a per-coordinate
    index: 3× faster on CPU, and no memory per coordinate. ``hashes`` gives every coordinate's
    bucket and sign explicitly (the definition; tests check ``add`` against it).
    s_c = h mod d, so for d' | d the d-bucket sketch folded to d' is exactly the d'-bucket one.
    """

    def __init__(self, spec: SketchSpec, batched: bool | None = None):
        self.spec = spec
        self.batched = batched  # None: grouped kernels off the CPU, contiguous runs on it
        self._tau: dict[str, torch.Tensor] = {}
        self._tables: dict[str, tuple[list[float], list[int], list[int]]] = {}
        self._device_tables: dict[str | tuple, tuple[torch.Tensor, ...]] = {}

    def _chunk_hashes(self, name: str, chunks: torch.Tensor):
        """Sign σ (±1 float), bucket shift s ∈ [0, d) and window offset u ∈ [0, CHUNK)."""
        h = _mix(chunks * _GOLDEN + _name_key(self.spec.seed, name))
        sign = 1.0 - 2.0 * _shr(h, 63).to(torch.float32)
        shift = _shr(h, 1) % self.spec.dim
        offset = _shr(_mix(h + _GOLDEN), 1) % CHUNK
        return sign, shift, offset

    def signs(self, device=None) -> torch.Tensor:
        """τ: the 2·CHUNK random signs that chunks take their sign windows from."""
        key = str(device or "cpu")
        tau = self._tau.get(key)
        if tau is None:
            h = _mix(torch.arange(2 * CHUNK, dtype=torch.int64) * _GOLDEN + self.spec.seed)
            tau = (1.0 - 2.0 * _shr(h, 63).to(torch.float32)).to(device)
            self._tau[key] = tau
        return tau

    def hashes(
        self, name: str, start: int, stop: int, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (int64 in [0, d)) and sign (±1 float) of flat coordinates [start, stop)."""
        idx = torch.arange(start, stop, dtype=torch.int64)
        k = idx % CHUNK
        sign, shift, offset = self._chunk_hashes(name, idx // CHUNK)
        bucket = (k + shift) % self.spec.dim
        return bucket.to(device), (sign * self.signs()[offset + k]).to(device)

    def _table(self, name: str, chunks: int) -> tuple[list[float], list[int], list[int]]:
        table = self._tables.get(name)
        if table is None or len(table[0]) < chunks:
            sign, shift, offset = self._chunk_hashes(name, torch.arange(chunks))
            table = (sign.tolist(), shift.tolist(), offset.tolist())
            self._tables[name] = table
        return table

    def prepare(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hash these parameters' chunks now (e.g. before timing a pass)."""
        for name, p in named:
            self._table(name, -(-p.numel() // CHUNK))
            self.signs(p.device)

    def add(self, out: torch.Tensor, name: str, values: torch.Tensor, offset: int = 0) -> None:
        """out += S(values placed at flat ``offset`` of parameter ``name``)."""
        flat = values.detach().reshape(-1)
        end = offset + flat.numel()
        table = self._table(name, -(-end // CHUNK))
        whole = range(-(-offset // CHUNK), end // CHUNK)  # chunks entirely inside the slice
        batched = self.batched if self.batched is not None else flat.device.type != "cpu"
        if batched and len(whole):
            a, b = whole.start * CHUNK - offset, whole.stop * CHUNK - offset
            self._add_runs(out, flat[:a], offset, table)
            self._add_grouped(out, flat[a:b], name, whole, table)
            self._add_runs(out, flat[b:], offset + b, table)
        else:
            self._add_runs(out, flat, offset, table)

    def _add_runs(self, out: torch.Tensor, flat: torch.Tensor, offset: int, table) -> None:
        """Chunk by chunk: each chunk's buckets are one or two contiguous runs (fast on CPU,
        where a chunk's sign window and buckets stay in cache)."""
        end, dim = offset + flat.numel(), self.spec.dim
        tau = self.signs(flat.device)
        sign, shift, window = table
        pos = offset
        while pos < end:
            c, k = divmod(pos, CHUNK)
            n = min(end, (c + 1) * CHUNK) - pos
            v = flat[pos - offset : pos - offset + n].to(torch.float32)
            t = tau[window[c] + k : window[c] + k + n]
            b, i = (shift[c] + k) % dim, 0
            while i < n:  # buckets b, b+1, ... wrapping at d: two runs when CHUNK ≤ d
                run = min(n - i, dim - b)
                out[b : b + run].addcmul_(v[i : i + run], t[i : i + run], value=sign[c])
                i, b = i + run, 0
            pos += n

    def _add_grouped(
        self, out: torch.Tensor, flat: torch.Tensor, name: str, chunks: range, table
    ) -> None:
        """Whole chunks, ``GROUP`` at a time with one index_add_: a few kernels per group rather
        than two per chunk (on a GPU, launches would dominate a 7B model's ~10^5 chunks)."""
        dev, dim = flat.device, self.spec.dim
        # Row u + 2·CHUNK·[σ < 0] of the windows of [τ, −τ] is σ·τ[u : u + CHUNK]: one gather
        # gives each chunk its signs. Buckets k + s_c < d + CHUNK go to a buffer folded mod d
        # at the end, so no per-coordinate modulo. The per-chunk tables are kept on the device:
        # copying them from host memory on every pass would stall the GPU's queue.
        if str(dev) not in self._device_tables:  # per device: the signed windows, k = 0..CHUNK-1
            tau = self.signs(dev)
            self._device_tables[str(dev)] = (
                torch.cat([tau, -tau]).unfold(0, CHUNK, 1),
                torch.arange(CHUNK, dtype=torch.int32, device=dev),
            )
        windows, k = self._device_tables[str(dev)]
        key = (name, str(dev), chunks.start, chunks.stop)
        if key not in self._device_tables:  # per parameter slice: each chunk's window and shift
            sign, shift, window = (x[chunks.start : chunks.stop] for x in table)
            pick = [u + 2 * CHUNK * (s < 0) for s, u in zip(sign, window)]
            self._device_tables[key] = (
                torch.tensor(pick, device=dev),
                torch.tensor(shift, dtype=torch.int32, device=dev)[:, None],
            )
        pick, shifts = self._device_tables[key]
        folds = -(-(dim + CHUNK) // dim)
        wide = torch.zeros(folds * dim, dtype=torch.float32, device=dev)
        rows = flat.view(-1, CHUNK)
        for g in range(0, rows.shape[0], GROUP):
            signed = (rows[g : g + GROUP] * windows[pick[g : g + GROUP]]).to(torch.float32)
            wide.index_add_(0, (k + shifts[g : g + GROUP]).view(-1), signed.view(-1))
        out += wide.view(folds, dim).sum(0)

    def sketch_named(
        self, tensors: Iterable[tuple[str, torch.Tensor]], device=None
    ) -> torch.Tensor:
        """Sketch of the concatenation of named tensors (order does not matter)."""
        out = None
        for name, t in tensors:
            if out is None:
                out = torch.zeros(self.spec.dim, dtype=torch.float32, device=device or t.device)
            self.add(out, name, t.to(out.device))
        if out is None:
            raise ValueError("nothing to sketch")
        return out


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


def fold(sketch: torch.Tensor, dim: int) -> torch.Tensor:
    """The same vector's CountSketch with ``dim`` buckets, when ``dim`` divides the sketch's.

    Bucket b of a d-bucket sketch is h mod d, and (h mod d) mod d' = h mod d' when d' | d; the
    signs do not depend on d. So summing the d/d' slices is exactly the d'-bucket sketch.
    """
    d = sketch.shape[-1]
    if dim == d:
        return sketch
    if d % dim:
        raise ValueError(f"cannot fold a {d}-bucket sketch to {dim} buckets")
    return sketch.reshape(*sketch.shape[:-1], d // dim, dim).sum(-2)


def part_dim(sketch_dim: int, wanted: int) -> int:
    """Buckets kept per part sketch: ``wanted`` when it divides the sketch, else the sketch's."""
    return wanted if wanted < sketch_dim and sketch_dim % wanted == 0 else sketch_dim


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
        from merit.calibrate.memory import free_memory

        free = free_memory(next(model.parameters()).device)
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
