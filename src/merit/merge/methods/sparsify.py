"""What the task-vector merges share (registers no method): trimming task vectors by magnitude or
at random, and the sign consensus of TIES.

Each takes flat float32 chunks of θ0 and the K checkpoints (the engine's scratch buffers, which
they overwrite) and follows mergekit 0.1.5's ``generalized_task_arithmetic`` step for step: task
vectors δ_k = θ_k − θ0, trimmed, weighted by w_k, an elected sign per element (that of Σ_k w_k δ_k,
+ on a tie), the disjoint sum of the agreeing ones, divided (``normalize``) by the weights that
took part, times λ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Elements per piece when a whole-tensor statistic walks a tensor: a bounded float32 buffer.
_PIECE = 1 << 20


def task_vectors(theta0: torch.Tensor, thetas: list[torch.Tensor]) -> list[torch.Tensor]:
    """δ_k = θ_k − θ0, in place in the scratch buffers."""
    return [theta.sub_(theta0) for theta in thetas]


def magnitude_threshold(
    theta0: torch.Tensor, theta: torch.Tensor, density: float
) -> tuple[float, int]:
    """Where trimming cuts the whole tensor's task vector |θ − θ0| to its k = max(1, ⌊density·n⌋)
    largest (mergekit's count): (t, cut) such that the kept elements are those above t, and of
    those equal to t the ones at an index below ``cut`` — exactly k, the ties in index order
    (bf16 task vectors take few distinct values, so ties at t are common).

    t is found by :func:`kth_largest`'s radix select, streamed: the magnitudes are recomputed
    piece by piece in one reused buffer (no tensor-sized copy), one pass for the histogram of
    their high 16 bits, one for the low 16 bits within the chosen bin; the histograms also count
    the elements above t and equal to it, so the cut among ties costs a third pass only when
    some of them are dropped."""
    n = theta.numel()
    if density >= 1 or n == 0:
        return 0.0, n
    k = max(1, int(density * n))
    buf = torch.empty(min(n, _PIECE), dtype=torch.float32)

    def magnitudes():  # the inputs are the stored (memory-mapped) tensors, never written
        for s, e in pieces(n):
            yield s, buf[: e - s].copy_(theta[s:e]).sub_(theta0[s:e]).abs_().view(torch.int32)

    high = torch.zeros(1 << 15, dtype=torch.int64)
    for _, bits in magnitudes():
        high += torch.bincount(bits >> 16, minlength=1 << 15)
    above, b = _bin_from_top(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for _, bits in magnitudes():
        low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
    above_low, low_bits = _bin_from_top(low, k - above)
    t_bits = (b << 16) | low_bits
    t = float(torch.tensor([t_bits], dtype=torch.int32).view(torch.float32))
    quota = k - above - above_low  # the ties at t that are kept, in index order
    if quota == int(low[low_bits]):
        return t, n
    seen = 0
    for s, bits in magnitudes():
        at = torch.nonzero(bits == t_bits).squeeze(1)
        if seen + at.numel() >= quota:
            return t, s + int(at[quota - seen - 1]) + 1
        seen += at.numel()
    raise AssertionError("the histograms counted more ties than there are")


def trim(delta: torch.Tensor, threshold: tuple[float, int], start: int) -> torch.Tensor:
    """Zero the elements of a chunk (from element ``start``) of a task vector that
    :func:`magnitude_threshold` does not keep: those below t, and those equal to t from index
    ``cut`` on. A multiply by the keep mask (several times faster than ``masked_fill_``)."""
    t, cut = threshold
    n = delta.numel()
    if t <= 0 and cut >= start + n:
        return delta
    size = delta.abs()
    if start + n <= cut:  # every tie at t in this chunk is kept
        return delta.mul_(size >= t)
    if start >= cut:  # every tie at t in this chunk is dropped
        return delta.mul_(size > t)
    keep = size > t  # the chunk the cut falls in
    keep[: cut - start] |= size[: cut - start] == t
    return delta.mul_(keep)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest of non-negative float32 ``values``, exactly, by a two-pass radix select
    on their bits (ordered as integers for non-negative floats): a histogram of the high 16
    bits finds the bin, one of the low 16 bits within it the value. Several times faster than
    ``kthvalue`` on large tensors, and the same value."""
    bits = values.view(torch.int32)
    high = bits >> 16
    above, b = _bin_from_top(torch.bincount(high, minlength=1 << 15), k)
    low = torch.bincount(bits[high == b] & 0xFFFF, minlength=1 << 16)
    _, low_bits = _bin_from_top(low, k - above)
    return float(torch.tensor([(b << 16) | low_bits], dtype=torch.int32).view(torch.float32))


def _bin_from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(elements in bins above, the bin) of the k-th largest element of a histogram."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    return (int(from_top[i - 1]) if i else 0), counts.numel() - 1 - i


def uniform(start: int, n: int, stream: int, seed: int) -> torch.Tensor:
    """Uniform [0, 1) numbers for elements ``start .. start + n`` of one tensor and input
    ``stream``: splitmix64 of the element's index, so a chunk draws the same numbers however
    the tensor is cut into chunks (a generator's stream would depend on the cut)."""
    golden = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    # Counter = the element's index in its own range of 2^40 per (seed, stream), wrapped to int64.
    first = _int64(((seed * 1_000_003 + stream) << 40) + start)
    x = torch.arange(n, dtype=torch.int64).add_(first).mul_(golden)
    for shift, mul in ((30, -4658895280553007687), (27, -7723592293110705685)):
        x = (x ^ _logical_shift(x, shift)) * mul  # 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
    x = x ^ _logical_shift(x, 31)
    return _logical_shift(x, 11).to(torch.float64).mul_(2.0**-53).to(torch.float32)


def _int64(value: int) -> int:
    """``value`` modulo 2^64 as a signed 64-bit integer (torch's int64 arithmetic wraps alike)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def drop_at_random(
    deltas: list[torch.Tensor], density: float, start: int, seed: int
) -> list[torch.Tensor]:
    """DARE: each element kept with probability ``density`` and rescaled by 1/density, so the
    expected task vector is unchanged (arXiv 2311.03099, eq. 2)."""
    if density >= 1:
        return deltas
    for k, d in enumerate(deltas):
        keep = uniform(start, d.numel(), k, seed) < density
        d.mul_(keep).div_(density)
    return deltas


def consensus(
    theta0: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    scale: float,
    normalize: bool,
) -> torch.Tensor:
    """TIES' merge of trimmed task vectors: elect a sign, sum the agreeing weighted ones, divide
    by their weights (``normalize``), scale by λ, add to θ0."""
    for d, w in zip(deltas, weights):
        d.mul_(w)
    majority = torch.stack(deltas).sum(0).ge_(0).mul_(2).sub_(1)  # +1 / -1; a tie elects +
    mixed = torch.zeros_like(theta0)
    divisor = torch.zeros_like(theta0)
    for d, w in zip(deltas, weights):
        agree = d.sign().eq_(majority)
        mixed.addcmul_(d, agree)  # d·1 or d·0 is exact: the same sum as adding d * agree
        divisor.add_(agree, alpha=w)
    if normalize:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return theta0.add_(mixed, alpha=scale)


def weighted_sum(
    theta0: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float], scale: float
) -> torch.Tensor:
    """θ0 + λ·Σ_k w_k δ_k (task arithmetic of trimmed task vectors)."""
    mixed = torch.zeros_like(theta0)
    for d, w in zip(deltas, weights):
        mixed.add_(d, alpha=w)
    return theta0.add_(mixed, alpha=scale)


def pieces(n: int):
    """(start, stop) of bounded pieces of a flat tensor of ``n`` elements."""
    return ((s, min(n, s + _PIECE)) for s in range(0, n, _PIECE))
