"""The Gram matrix of the sketches, kept with them: extending a calibration multiplies the new
rows only."""

from __future__ import annotations

import numpy as np


def extend_gram(vectors: np.ndarray, known: np.ndarray | None = None, rows=()) -> np.ndarray:
    """Gram matrix of ``vectors`` (n × d), reusing ``known`` — the Gram of ``vectors[rows]`` —
    so that only the new rows are multiplied: O(new · n · d) instead of O(n² d)."""
    v = np.asarray(vectors)
    n = len(v)
    rows = list(rows)
    out = np.empty((n, n))
    if rows:
        out[np.ix_(rows, rows)] = known
    new = sorted(set(range(n)) - set(rows))
    if new:
        cross = (v[new] @ v.T).astype(np.float64)
        out[new, :] = cross
        out[:, new] = cross.T
    return out
