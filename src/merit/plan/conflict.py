"""Gradient conflict structure: cosine matrix and PCA conflict embedding (paper §3.2).

Everything here works on inner products of sketched gradients. The Gram matrix of the datasets'
mean gradients comes from the full sketches; the Gram of their calibration *parts* (a few
disjoint micro-batches per dataset, see ``merit.calibrate.sketch``) gives, for any re-weighting of the
parts, the Gram of the re-weighted means: a bootstrap draw costs a T × T product, no sketch work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from merit.calibrate.gram import extend_gram  # noqa: F401  (the Gram is calibration's)


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """C_ij = G_ij / sqrt(G_ii G_jj), diagonal 1, clipped to [-1, 1]."""
    g = np.asarray(gram, dtype=np.float64)
    d = np.diag(g).copy()
    if np.any(d <= 0):
        raise ValueError("a dataset has a zero gradient: its calibration examples carry no loss")
    n = np.sqrt(d)
    c = g / np.outer(n, n)
    np.fill_diagonal(c, 1.0)
    return np.clip(c, -1.0, 1.0)


def cosine_matrix(sketches: np.ndarray) -> np.ndarray:
    """C_ij = <g_i/|g_i|, g_j/|g_j|> estimated from the rows of ``sketches`` (T × d)."""
    g = np.asarray(sketches, dtype=np.float64)
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a dataset has a zero gradient: its calibration examples carry no loss")
    u = g / norms
    c = u @ u.T
    np.fill_diagonal(c, 1.0)
    return np.clip(c, -1.0, 1.0)


@dataclass
class Embedding:
    z: np.ndarray  # T × r conflict embedding
    explained_variance: np.ndarray  # ratio of each of the r axes
    scree: np.ndarray | None = None  # ratio of every axis (for the scree plot)


def conflict_embedding(c: np.ndarray, rank: int) -> Embedding:
    """PCA of the rows of C: dataset t is described by its cosines with every dataset.

    Signs are fixed (largest |loading| positive) so that plans are reproducible across machines.
    """
    x = np.asarray(c, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    z = u[:, :rank] * s[:rank]
    for j in range(z.shape[1]):
        if z[np.argmax(np.abs(z[:, j])), j] < 0:
            z[:, j] = -z[:, j]
    scree = ratio.copy()
    if z.shape[1] < rank:  # fewer datasets than axes: pad with zero axes
        z = np.pad(z, ((0, 0), (0, rank - z.shape[1])))
        ratio = np.pad(ratio, (0, max(0, rank - ratio.size)))
    return Embedding(z=z, explained_variance=ratio[:rank], scree=scree)


@dataclass
class PartGram:
    """Inner products of every dataset's part sketches.

    ``gram[a, b]`` = <s_a, s_b> over all parts a, b (each part's token-mean gradient sketch);
    ``owner[a]`` is the dataset of part a and ``tokens[a]`` its answer tokens. A dataset's mean
    gradient is the token-weighted mean of its parts, so for part weights W (T × parts, rows
    summing to 1) the datasets' Gram is W gram Wᵀ.
    """

    gram: np.ndarray
    owner: np.ndarray
    tokens: np.ndarray

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray], tokens: Sequence[Sequence[int]]) -> PartGram:
        """``parts[t]`` is dataset t's M_t × d' part sketches, ``tokens[t]`` their tokens."""
        stacked = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
        owner = np.concatenate([np.full(len(p), t) for t, p in enumerate(parts)])
        tok = np.concatenate([np.asarray(n, dtype=np.float64) for n in tokens])
        return cls(stacked @ stacked.T, owner, tok)

    @property
    def datasets(self) -> int:
        return int(self.owner.max()) + 1

    def weights(self, counts: np.ndarray | None = None, rescale: bool = False) -> np.ndarray:
        """T × parts weights of the token-weighted mean of (``counts`` copies of) each part.

        With ``rescale``, a draw's deviation from the full-sample mean is stretched by
        sqrt(M / (M − 1)) (M = the dataset's parts): a bootstrap over M parts spreads only
        (M − 1)/M as much as a new sample would (the rescaled bootstrap).
        """
        c = np.ones_like(self.tokens) if counts is None else np.asarray(counts, dtype=np.float64)
        w = np.zeros((self.datasets, len(self.owner)))
        w[self.owner, np.arange(len(self.owner))] = c * self.tokens
        w = w / w.sum(axis=1, keepdims=True)
        if rescale and counts is not None:
            w0 = self.weights()
            m = np.bincount(self.owner, minlength=self.datasets).astype(np.float64)
            f = np.sqrt(m / np.maximum(m - 1, 1))[:, None]
            w = w0 + f * (w - w0)
        return w

    def dataset_gram(self, counts: np.ndarray | None = None, rescale: bool = False) -> np.ndarray:
        w = self.weights(counts, rescale)
        return w @ self.gram @ w.T

    def noise(self) -> np.ndarray:
        """E|ŝ_t − g_t|² of each dataset's mean: the bias that sampling adds to |ŝ_t|².

        With part variances σ²/n_m, Σ_m n_m |s_m − s̄|² has expectation (M − 1) σ², and the mean
        over N tokens has variance σ²/N. Zero for datasets with a single part (unknown).
        """
        out = np.zeros(self.datasets)
        mean_sq = np.diag(self.dataset_gram())
        for t in range(self.datasets):
            idx = np.flatnonzero(self.owner == t)
            m = len(idx)
            if m < 2:
                continue
            n = self.tokens[idx]
            big_n = n.sum()
            spread = float(n @ np.diag(self.gram)[idx]) - big_n * mean_sq[t]
            out[t] = max(spread, 0.0) / ((m - 1) * big_n)
        return out

    def bootstrap_counts(self, rng: np.random.Generator) -> np.ndarray:
        """How many times each part is drawn when every dataset's parts are resampled."""
        counts = np.zeros(len(self.owner))
        for t in range(self.datasets):
            idx = np.flatnonzero(self.owner == t)
            counts[idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)))
        return counts


def debiased_gram(gram: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The Gram with each |g_t|² estimate corrected for sampling noise (off-diagonal entries
    pair independent samples, so they are unbiased already); kept positive."""
    g = np.array(gram, dtype=np.float64)
    d = np.diag(g)
    np.fill_diagonal(g, np.maximum(d - noise, 0.05 * d))
    return g


def offdiag_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the off-diagonal entries of two square matrices."""
    mask = ~np.eye(a.shape[0], dtype=bool)
    x, y = np.asarray(a)[mask], np.asarray(b)[mask]
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
