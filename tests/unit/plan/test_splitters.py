"""Conflict embedding and recursive median splits."""

import numpy as np
import pytest

from merit.plan.conflict import conflict_embedding, cosine_matrix
from merit.plan.splitters import PlanError, balanced_cut, group_weights, median_split


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


# -- splitters, any K, predicted gain, stability -------------------------------------------------
from merit.plan.conflict import PartGram  # noqa: E402
from merit.plan.splitters import (  # noqa: E402
    PlanInputs,
    balance_of,
    choose,
    compare,
    gain_identity,
    random_split,
    sign_split,
    splitters,
)
from merit.plan.stability import (  # noqa: E402
    adjusted_rand_index,
    align_labels,
    changed_groups,
    resampled_grams,
    stability,
)


def _three_opposed(n_per=6, dim=500, seed=0, noise=1.0):
    """Three groups of datasets whose gradients point along three directions at 120° (a simplex:
    every pair of groups conflicts equally, cosine −1/2), plus noise."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T * np.sqrt(dim)
    dirs = [u[0], -0.5 * u[0] + 0.866 * u[1], -0.5 * u[0] - 0.866 * u[1]]
    g = np.array(
        [3 * dirs[c] + noise * rng.normal(size=dim) for c in range(3) for _ in range(n_per)]
    )
    truth = np.repeat(np.arange(3), n_per)
    perm = rng.permutation(len(g))
    return g[perm], truth[perm]


def _inputs(g, samples=None, tokens=None):
    t = len(g)
    return PlanInputs.from_gram(
        g @ g.T,
        np.ones(t) if samples is None else samples,
        np.ones(t) if tokens is None else tokens,
    )


def test_any_k_partitioner_recovers_three_opposed_groups_bisection_cannot():
    g, truth = _three_opposed()
    x = _inputs(g)
    sp = splitters()
    found = sp["gain"](x, 3, np.random.default_rng(0))
    assert adjusted_rand_index(found, truth) == pytest.approx(1.0)
    # Recursive bisection makes 2 or 4 groups: it must cut a group in two or join two.
    for name in ("median", "sign"):
        for k in (2, 4):
            bis = sp[name](x, k, np.random.default_rng(0))
            assert adjusted_rand_index(bis, truth) < 0.8
    # ... and it is not asked to do K = 3.
    with pytest.raises(PlanError, match="K = 2\\^r"):
        sp["median"](x, 3, np.random.default_rng(0))
    # The recovered partition has the largest predicted gain of every candidate here.
    best = gain_identity(x.gram, found, x.tokens, 3)[0]
    rand = gain_identity(x.gram, random_split(x.samples, 3, np.random.default_rng(1)), x.tokens, 3)
    assert best > rand[0]


def test_gain_partition_beats_median_and_respects_balance():
    rng = np.random.default_rng(4)
    t = 30
    g = rng.normal(size=(t, 80)) + 2 * rng.normal(size=(5, 80))[rng.integers(0, 5, t)]
    samples = rng.integers(40, 80, size=t).astype(float)
    tokens = samples * rng.uniform(20, 40, size=t)
    x = _inputs(g, samples, tokens)
    sp = splitters(tolerance=0.1)
    med = sp["median"](x, 4, np.random.default_rng(0))
    gain = sp["gain"](x, 4, np.random.default_rng(0))
    assert gain_identity(x.gram, gain, tokens, 4)[0] >= gain_identity(x.gram, med, tokens, 4)[0]
    for groups in (gain, sp["random"](x, 4, np.random.default_rng(0))):
        load = np.bincount(groups, weights=samples, minlength=4)
        assert np.all(np.abs(load / (samples.sum() / 4) - 1) <= 0.1 + 1e-9), load
    # Seeded: the same generator seed gives the same partition.
    np.testing.assert_array_equal(gain, sp["gain"](x, 4, np.random.default_rng(0)))


def test_gain_identity_share_and_formula():
    g, _ = _three_opposed(n_per=3, dim=40)
    tokens = np.arange(1.0, 10.0)
    x = _inputs(g, tokens=tokens)
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    gain, share = gain_identity(x.gram, groups, tokens, 3)
    pi = tokens / tokens.sum()
    gbar = pi @ g
    direct = 0.0
    for k in range(3):
        m = groups == k
        gk = (tokens[m, None] * g[m]).sum(0) / tokens[m].sum()
        direct += tokens[m].sum() / tokens.sum() * np.sum((gk - gbar) ** 2)
    assert gain == pytest.approx(direct / 2, rel=1e-10)
    total = sum(p * np.sum((gi - gbar) ** 2) for p, gi in zip(pi, g))
    assert share == pytest.approx(direct / total, rel=1e-10)
    assert gain_identity(x.gram, np.arange(9), tokens, 9)[1] == pytest.approx(1.0)


def test_sign_split_cuts_at_zero_within_tolerance():
    z = np.array([[-3.0], [-2.0], [-1.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    # Median would put 4 below; the sign change is at 3: a group of 3 = 4 × (1 − 0.25).
    assert sign_split(z, np.ones(8), 1, tolerance=0.25).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert sign_split(z, np.ones(8), 1, tolerance=0.2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sign_split(z, np.ones(8), 1, tolerance=0.0).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_ari_and_alignment():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == 1.0
    assert adjusted_rand_index(a, np.array([2, 2, 0, 0, 1, 1])) == 1.0  # labels do not matter
    assert adjusted_rand_index(a, np.array([0, 1, 2, 0, 1, 2])) < 0
    np.testing.assert_array_equal(align_labels(a, np.array([2, 2, 0, 0, 1, 1]), 3), a)
    assert changed_groups(
        ["p", "q", "r", "s"], [0, 0, 1, 1], ["p", "q", "r", "s", "t"], [1, 1, 1, 0, 0], 2
    ) == ["r"]


def _part_gram(seed=0, noise=6.0):
    g, truth = _three_opposed(n_per=4, dim=200, seed=seed)
    rng = np.random.default_rng(seed + 100)
    parts = [gi + noise * rng.normal(size=(5, gi.size)) for gi in g]
    tokens = [rng.integers(10, 20, size=5) for _ in g]
    return PartGram.from_parts(parts, tokens), truth


def test_bootstrap_is_reproducible_with_a_seed():
    pg, _ = _part_gram()
    a = resampled_grams(pg, 5, seed=7)
    b = resampled_grams(pg, 5, seed=7)
    c = resampled_grams(pg, 5, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], c[0])
    x = PlanInputs.from_gram(pg.dataset_gram(), np.ones(12), np.ones(12), pg.noise())
    r1 = compare(x, 3, pg, draws=6, seed=1)
    r2 = compare(x, 3, pg, draws=6, seed=1)
    for p, q in zip(r1, r2):
        assert p.splitter == q.splitter and p.available == q.available
        if p.available:
            np.testing.assert_array_equal(p.groups, q.groups)
            np.testing.assert_array_equal(p.stability.per_dataset, q.stability.per_dataset)
            assert p.stability.ari_pairs == q.stability.ari_pairs


def test_stability_falls_with_sampling_noise():
    quiet, truth = _part_gram(noise=0.5)
    loud, _ = _part_gram(noise=40.0)
    out = []
    for pg in (quiet, loud):
        x = PlanInputs.from_gram(pg.dataset_gram(), np.ones(12), np.ones(12), pg.noise())
        cand = {c.splitter: c for c in compare(x, 3, pg, draws=8, seed=0)}["gain"]
        out.append(cand.stability)
    assert out[0].ari_pairs == pytest.approx(1.0) and out[0].per_dataset.min() == 1.0
    assert out[1].ari_pairs < 0.9 and out[1].per_dataset.min() < 1.0
    # No draws, no measurement.
    assert stability(truth, [], 3).draws == 0


def test_compare_and_choose():
    pg, _ = _part_gram(noise=0.5)
    x = PlanInputs.from_gram(pg.dataset_gram(), np.ones(12), np.ones(12), pg.noise())
    cands = compare(x, 3, pg, draws=2, seed=0)
    by = {c.splitter: c for c in cands}
    assert not by["median"].available and "power of two" in by["median"].note
    assert cands[choose(cands, "auto", "gain")].splitter == "gain"
    assert cands[choose(cands, "random", "gain")].splitter == "random"
    with pytest.raises(PlanError, match="cannot make this plan"):
        choose(cands, "median", "gain")
    with pytest.raises(PlanError, match="hessian"):
        choose(cands, "auto", "merged_loss")
    by["random"].merged_loss, by["gain"].merged_loss = 1.0, 2.0
    assert cands[choose(cands, "auto", "merged_loss")].splitter == "random"


def test_planning_config_checks():
    from merit.config import ConfigError, config_from_dict

    base = {"data": {"bigbench": "x"}}
    ok = config_from_dict({**base, "planning": {"k": 3, "splitter": "gain"}})
    assert ok.planning.groups == 3
    assert config_from_dict({**base, "planning": {"rank": 3}}).planning.groups == 8
    with pytest.raises(ConfigError, match="K = 2\\^r"):
        config_from_dict({**base, "planning": {"k": 3}})
    with pytest.raises(ConfigError, match="hessian"):
        config_from_dict({**base, "planning": {"splitter": "auto", "objective": "merged_loss"}})
    with pytest.raises(ConfigError, match="must divide"):
        config_from_dict({**base, "calibration": {"sketch_dim": 4096, "microbatch_dim": 1000}})


def test_median_split_reports_its_balance_and_warns_past_the_tolerance():
    """One dataset holds most samples: no cut of indivisible datasets balances two groups, and
    the median candidate must say so (balance, deviation and a warning naming the setting)."""
    g, _ = _planted()
    skewed = np.full(len(g), 10.0)
    skewed[3] = 1000.0
    by = {c.splitter: c for c in compare(_inputs(g, skewed), 2, tolerance=0.1)}
    med = by["median"]
    load = np.bincount(med.groups, weights=skewed, minlength=2)
    assert med.balance == pytest.approx(load.max() / load.min())
    assert med.deviation == pytest.approx(np.abs(load / (skewed.sum() / 2) - 1).max())
    assert med.deviation > 0.1
    assert len(med.warnings) == 1 and "unbalanced median plan" in med.warnings[0]
    assert "planning.balance_tolerance=0.1" in med.warnings[0]
    assert med.note == f"unbalanced: a group {med.deviation:.0%} off total/K (> 10%)"
    # Past any tolerance whatever the splitter: every available candidate warns.
    assert all(c.warnings for c in by.values() if c.available)
    assert "ignores the data" in by["random"].note
    # Equal datasets split evenly: balance 1, no warning.
    even = {c.splitter: c for c in compare(_inputs(g), 2, tolerance=0.1)}["median"]
    assert even.balance == 1.0 and even.deviation == 0.0
    assert even.warnings == [] and even.note == ""


def test_balance_of_and_tolerance_edge():
    groups = np.array([0, 0, 1, 1])
    ratio, dev = balance_of(groups, [30, 25, 25, 20], 2)
    assert ratio == pytest.approx(55 / 45) and dev == pytest.approx(0.1)
    from merit.plan.splitters import balance_warning

    assert balance_warning("median", groups, [30, 25, 25, 20], 2, tolerance=0.1) is None
    assert "10%" in balance_warning("median", groups, [30, 25, 25, 20], 2, tolerance=0.09)
