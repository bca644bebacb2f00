"""Conflict embedding and recursive median splits."""

import numpy as np
import pytest

from merit.conflict import conflict_embedding, cosine_matrix
from merit.planning import PlanError, balanced_cut, group_weights, median_split


def _planted(n_per=6, dim=400, seed=0, opposed=True):
    """Two clusters of dataset gradients pulling in opposite directions, plus noise."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    shared = rng.normal(size=dim)
    a = [shared + 3 * u + rng.normal(size=dim) for _ in range(n_per)]
    b = [shared - 3 * u + rng.normal(size=dim) for _ in range(n_per)]
    g = np.array(a + b)
    perm = rng.permutation(len(g))
    truth = np.array([0] * n_per + [1] * n_per)
    return g[perm], truth[perm]


def test_cosine_matrix_properties():
    g, _ = _planted()
    c = cosine_matrix(g)
    assert np.allclose(c, c.T)
    assert np.allclose(np.diag(c), 1.0)
    assert c.min() >= -1 and c.max() <= 1
    with pytest.raises(ValueError):
        cosine_matrix(np.vstack([g, np.zeros(g.shape[1])]))


def test_planted_conflict_is_split_apart():
    g, truth = _planted()
    emb = conflict_embedding(cosine_matrix(g), rank=1)
    groups = median_split(emb.z, np.ones(len(g)), rank=1)
    # The split equals the planted clusters (up to naming).
    assert len(set(zip(groups.tolist(), truth.tolist()))) == 2
    assert emb.explained_variance[0] > 0.5


def test_k_is_two_to_the_r_and_balanced():
    rng = np.random.default_rng(1)
    t = 40
    z = rng.normal(size=(t, 3))
    samples = rng.integers(50, 60, size=t).astype(float)
    groups = median_split(z, samples, rank=3)
    assert sorted(np.unique(groups).tolist()) == list(range(8))
    sizes = np.array([samples[groups == k].sum() for k in range(8)])
    assert sizes.max() / sizes.min() < 1.35  # 5 datasets a group, sample counts 50..59
    counts = np.bincount(groups)
    assert counts.min() >= 4 and counts.max() <= 6


def test_balance_uses_samples_not_dataset_count():
    # One huge dataset balances against many small ones.
    z = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    samples = np.array([100.0, 100.0, 100.0, 100.0, 400.0])
    groups = median_split(z, samples, rank=1)
    assert groups.tolist() == [0, 0, 0, 0, 1]
    assert balanced_cut(z[:, 0], samples) == 4


def test_too_many_groups_refused():
    with pytest.raises(PlanError, match="more than the 3 datasets"):
        median_split(np.zeros((3, 2)), np.ones(3), rank=2)


def test_group_weights_are_token_fractions():
    groups = np.array([0, 1, 1, 0, 2])
    n, w = group_weights(groups, [10, 20, 30, 40, 100], 3)
    assert n == [50, 50, 100]
    assert w == pytest.approx([0.25, 0.25, 0.5])
    assert sum(w) == pytest.approx(1.0)


def test_embedding_is_deterministic_and_sign_fixed():
    g, _ = _planted(seed=3)
    e1 = conflict_embedding(cosine_matrix(g), 2)
    e2 = conflict_embedding(cosine_matrix(2.5 * g), 2)
    assert np.allclose(e1.z, e2.z, atol=1e-12)
    for j in range(2):
        assert e1.z[np.argmax(np.abs(e1.z[:, j])), j] > 0
