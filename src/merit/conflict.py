"""Gradient conflict structure: cosine matrix and PCA conflict embedding (paper §3.2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    if z.shape[1] < rank:  # fewer datasets than axes: pad with zero axes
        z = np.pad(z, ((0, 0), (0, rank - z.shape[1])))
        ratio = np.pad(ratio, (0, max(0, rank - ratio.size)))
    return Embedding(z=z, explained_variance=ratio[:rank])
