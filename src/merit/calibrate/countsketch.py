"""The CountSketch that compresses representative gradients (paper §3.1).

The paper keeps 1 coordinate in 5; a CountSketch keeps every coordinate, hashed into d signed
buckets, so <S a, S b> is an unbiased estimate of <a, b> with variance ≤ |a|²|b|²/d whatever the
model size (Charikar et al. 2002). Each coordinate's bucket and sign are a pure function of
(seed, parameter name, flat index): no index table is stored, and the sketch does not depend on
the order in which parameters are visited nor on how a parameter is cut into slices. Buckets are
hashed per chunk of 2^16 coordinates, signs per coordinate (``CountSketch``), so sketching is a
few contiguous multiply-adds per chunk. A sketch folds exactly to any divisor of its buckets
(``fold``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


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
