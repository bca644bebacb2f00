"""Gram-level conflict structure: parts, resampling, sampling-noise correction."""

import numpy as np
import pytest

from merit.plan.conflict import (
    PartGram,
    cosine_from_gram,
    cosine_matrix,
    debiased_gram,
    offdiag_pearson,
)


def _parts(t=4, m=6, d=300, noise=1.0, seed=0):
    """Part means of t datasets: a true gradient each plus per-part noise ~ σ²/n_m."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(t, d))
    parts, tokens = [], []
    for i in range(t):
        n = rng.integers(20, 60, size=m).astype(float)
        parts.append(truth[i] + noise * rng.normal(size=(m, d)) / np.sqrt(n)[:, None])
        tokens.append(n)
    return truth, parts, tokens


def test_cosine_from_gram_matches_cosine_matrix():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(7, 50))
    np.testing.assert_allclose(cosine_from_gram(g @ g.T), cosine_matrix(g), atol=1e-12)
    with pytest.raises(ValueError, match="zero gradient"):
        cosine_from_gram(np.diag([1.0, 0.0]))


def test_part_gram_gives_the_gram_of_token_weighted_means():
    _, parts, tokens = _parts()
    pg = PartGram.from_parts(parts, tokens)
    means = np.array([(n[:, None] * p).sum(0) / n.sum() for p, n in zip(parts, tokens)])
    np.testing.assert_allclose(pg.dataset_gram(), means @ means.T, rtol=1e-10)
    # A bootstrap draw is the Gram of the re-weighted means.
    rng = np.random.default_rng(3)
    counts = pg.bootstrap_counts(rng)
    for t in range(4):
        assert counts[pg.owner == t].sum() == (pg.owner == t).sum()
    w = counts * pg.tokens
    redrawn = np.array(
        [
            (w[pg.owner == t][:, None] * p).sum(0) / w[pg.owner == t].sum()
            for t, p in enumerate(parts)
        ]
    )
    np.testing.assert_allclose(pg.dataset_gram(counts), redrawn @ redrawn.T, rtol=1e-10)


def test_noise_estimate_is_unbiased():
    """E|ŝ_t|² = |g_t|² + noise; the estimate recovers the noise over many draws."""
    est, true_bias = [], []
    for seed in range(200):
        _, parts, tokens = _parts(t=2, m=5, d=200, noise=3.0, seed=seed)
        pg = PartGram.from_parts(parts, tokens)
        est.append(pg.noise())
        true_bias.append(200 * 9.0 / np.array([n.sum() for n in tokens]))  # d σ² / N
    ratio = np.mean(est, axis=0) / np.mean(true_bias, axis=0)
    assert np.all(np.abs(ratio - 1) < 0.08), ratio


def test_debiasing_brings_the_diagonal_back_to_the_truth():
    truth, parts, tokens = _parts(t=3, m=8, d=2000, noise=4.0, seed=1)
    pg = PartGram.from_parts(parts, tokens)
    raw = pg.dataset_gram()
    fixed = debiased_gram(raw, pg.noise())
    exact = np.diag(truth @ truth.T)
    assert np.all(np.abs(np.diag(fixed) - exact) < np.abs(np.diag(raw) - exact))
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_array_equal(fixed[off], raw[off])


def test_offdiag_pearson():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = a + a.T
    assert offdiag_pearson(a, a) == pytest.approx(1.0)
    assert offdiag_pearson(a, -a) == pytest.approx(-1.0)
    b = a.copy()
    np.fill_diagonal(b, 100.0)  # the diagonal does not count
    assert offdiag_pearson(a, b) == pytest.approx(1.0)


def test_extend_gram_reuses_known_rows():
    from merit.plan.conflict import extend_gram

    rng = np.random.default_rng(2)
    v = rng.normal(size=(6, 40))
    full = v @ v.T
    rows = [0, 2, 3, 5]
    known = full[np.ix_(rows, rows)]
    np.testing.assert_allclose(extend_gram(v, known, rows), full, rtol=1e-12)
    np.testing.assert_allclose(extend_gram(v), full, rtol=1e-12)
    # The known block is taken as given, not recomputed.
    fake = known + 1.0
    assert extend_gram(v, fake, rows)[0, 2] == pytest.approx(full[0, 2] + 1.0)


def test_rescaled_bootstrap_spreads_like_a_new_sample():
    """Over many draws, a rescaled bootstrap mean scatters around the sample mean as much as an
    independent new sample's mean scatters around the truth (plain bootstrap: (M−1)/M of it)."""
    _truth, parts, tokens = _parts(t=1, m=4, d=400, noise=2.0, seed=5)
    pg = PartGram.from_parts(parts, tokens)
    stacked = np.concatenate(parts)
    rng = np.random.default_rng(0)
    mean = pg.weights() @ stacked
    plain, scaled = [], []
    for _ in range(3000):
        c = pg.bootstrap_counts(rng)
        plain.append(np.sum((pg.weights(c) @ stacked - mean) ** 2))
        scaled.append(np.sum((pg.weights(c, rescale=True) @ stacked - mean) ** 2))
    assert np.mean(scaled) / np.mean(plain) == pytest.approx(4 / 3, rel=1e-9)
    # The spread of a fresh sample's mean, estimated without the truth: the noise estimate.
    assert np.mean(scaled) == pytest.approx(pg.noise()[0], rel=0.1)
