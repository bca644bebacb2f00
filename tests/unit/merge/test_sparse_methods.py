"""The task-vector merges beyond the average (task_arithmetic, ties, dare_*, model_stock): each
against a direct, unstreamed reference on small tensors, and streamed equal to it bitwise."""

from __future__ import annotations

import pytest
import torch
from merge_models import read_tensors

from merit.merge import arithmetic
from merit.merge.errors import MergeError
from merit.merge.methods import get_method
from merit.merge.methods.sparsify import uniform
from merit.merge.streaming import merge_checkpoints


def _apply(name: str, theta0, thetas, weights, **params) -> torch.Tensor:
    """The method on whole flat float32 tensors: statistics once, then one chunk."""
    method = get_method(name)
    p = method.validate(weights, params)
    theta0, thetas = theta0.float().flatten(), [t.float().flatten() for t in thetas]
    stats = method.statistics(theta0, thetas, tuple(weights), p) if method.statistics else None
    where = {"start": 0} if method.chunk_offset else {}
    return method.merge(theta0.clone(), [t.clone() for t in thetas], tuple(weights), p, stats,
                        **where)  # fmt: skip


def _mergekit_ties(theta0, thetas, weights, density, scale, normalize=True):
    """mergekit 0.1.5's generalized task arithmetic with magnitude trimming and sign consensus,
    written out directly (argsort top-k, stacked sums)."""
    deltas = torch.stack([t - theta0 for t in thetas])
    if density < 1:
        for d in deltas:
            k = max(1, int(density * d.numel()))
            mask = torch.zeros_like(d)
            mask[torch.argsort(d.abs(), descending=True)[:k]] = 1
            d.mul_(mask)
    w = torch.tensor(weights).unsqueeze(-1)
    deltas = deltas * w
    majority = (deltas.sum(0) >= 0).float() * 2 - 1
    mask = deltas.sign() == majority
    mixed = (deltas * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return theta0 + scale * mixed


def test_ties_elects_signs_and_takes_the_disjoint_mean_by_hand():
    theta0 = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.1]), torch.tensor([2.0, 1.5, -1.0, -0.2])
    full = _apply("ties", theta0, [a, b], [0.5, 0.5])
    # Signs elected from Σ w δ = [1.5, -0.25, 1, -0.05]; each element averages the agreeing ones.
    torch.testing.assert_close(full, torch.tensor([1.5, -2.0, 3.0, -0.2]))
    half = _apply("ties", theta0, [a, b], [0.5, 0.5], density=0.5)
    # a keeps 3 and -2, b keeps 2 and 1.5; the last element keeps nothing and stays θ0.
    torch.testing.assert_close(half, torch.tensor([2.0, -2.0, 3.0, 0.0]))
    doubled = _apply("ties", theta0, [a, b], [0.5, 0.5], density=0.5, scale=2.0)
    torch.testing.assert_close(doubled, 2 * half)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_is_mergekits_computation(density):
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(1000, generator=g)
    thetas = [theta0 + 0.1 * torch.randn(1000, generator=g) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    got = _apply("ties", theta0, thetas, weights, density=density, scale=1.5)
    want = _mergekit_ties(theta0, thetas, weights, density, 1.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dare_keeps_the_expected_task_vector_and_its_drops_do_not_depend_on_chunks():
    theta0 = torch.zeros(20_000)
    thetas = [torch.full((20_000,), 1.0), torch.full((20_000,), -3.0)]
    merged = _apply("dare_linear", theta0, thetas, [0.25, 0.75], density=0.2, seed=7)
    # Each element: 0.25·(1 or 0)/0.2 + 0.75·(−3 or 0)/0.2, expectation 0.25 − 2.25 = −2.
    assert abs(float(merged.mean()) - (-2.0)) < 0.05
    assert set(torch.unique(merged).tolist()) <= {0.0, 1.25, -11.25, -10.0}
    kept = float(
        (_apply("dare_linear", theta0, thetas[:1], [1.0], density=0.2) != 0).float().mean()
    )
    assert abs(kept - 0.2) < 0.01
    whole = uniform(0, 1000, 1, 3)
    torch.testing.assert_close(torch.cat([uniform(0, 300, 1, 3), uniform(300, 700, 1, 3)]), whole,
                               rtol=0, atol=0)  # fmt: skip
    assert not torch.equal(uniform(0, 1000, 0, 3), whole)  # each checkpoint its own drops


def test_model_stock_is_mergekits_formula():
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(500, generator=g)
    shared = 0.05 * torch.randn(500, generator=g)
    thetas = [theta0 + shared + 0.05 * torch.randn(500, generator=g) for _ in range(3)]
    offsets = [t - theta0 for t in thetas]
    cos = [
        (offsets[i] @ offsets[j]) / (offsets[i].norm() * offsets[j].norm())
        for i in range(3)
        for j in range(i + 1, 3)
    ]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    want = t * sum(thetas) / 3 + (1 - t) * theta0
    got = _apply("model_stock", theta0, thetas, [0.2, 0.3, 0.5])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < float(t) < 1  # agreeing branches: between θ0 and their mean


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.4, "scale": 2.0}), ("dare_ties", {"density": 0.5, "seed": 1}),
     ("dare_linear", {"density": 0.7, "scale": 3.0}), ("model_stock", {})],
)  # fmt: skip
def test_streamed_in_chunks_equals_the_whole_tensor_reference(
    base, branches, tmp_path, monkeypatch, method, params
):
    monkeypatch.setattr(arithmetic, "_CHUNK", 100)  # every tensor cut into many chunks
    weights = [0.5, 0.3, 0.2]
    merge_checkpoints(base, branches, weights, tmp_path / "out", method=method, params=params)
    got = read_tensors(tmp_path / "out")
    theta0, thetas = read_tensors(base), [read_tensors(b) for b in branches]
    for name, t in got.items():
        want = _apply(method, theta0[name], [s[name] for s in thetas], weights, **params)
        assert torch.equal(t.flatten(), want), name


def test_task_arithmetic_at_one_over_the_weights_is_the_linear_merge(base, branches, tmp_path):
    weights = [1.0, 2.0, 1.0]  # Σw = 4: λ = 1/4 is the average
    merge_checkpoints(base, branches, [w / 4 for w in weights], tmp_path / "lin", method="linear")
    merge_checkpoints(base, branches, weights, tmp_path / "ta", method="task_arithmetic",
                      params={"scale": 0.25})  # fmt: skip
    lin, ta = read_tensors(tmp_path / "lin"), read_tensors(tmp_path / "ta")
    assert all(torch.equal(lin[n], ta[n]) for n in lin)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_a_density_outside_0_1_is_refused(density):
    for method in ("ties", "dare_linear", "dare_ties"):
        with pytest.raises(MergeError, match=r"density must be in \(0, 1\]"):
            get_method(method).validate([0.5, 0.5], {"density": density})
    with pytest.raises(MergeError, match="at least 2 checkpoints"):
        get_method("model_stock").validate([1.0], {})


@pytest.mark.parametrize("n", [1, 5, 1000, 40_000])
def test_radix_select_is_kthvalue(n):
    from merit.merge.methods.sparsify import kth_largest

    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs()
    values[: n // 4] = (values[: n // 4] * 4).round() / 4  # duplicates and zeros
    for k in sorted({1, max(1, n // 3), n}):
        assert kth_largest(values, k) == float(values.kthvalue(n - k + 1).values)


def test_ties_keeps_exactly_density_n_elements_with_ties_in_index_order():
    theta0 = torch.zeros(10)
    theta = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0, 0.1, 2.0, 0.2])
    method = get_method("ties")
    p = method.validate([1.0], {"density": 0.4})  # k = 4: the 3 and the first three 2s
    stats = method.statistics(theta0, [theta], (1.0,), p)
    whole = method.merge(theta0.clone(), [theta.clone()], (1.0,), p, stats, start=0)
    assert whole.tolist() == [0, 2, 2, 2, 0, 0, 3, 0, 0, 0]
    halves = [method.merge(theta0[a:b].clone(), [theta[a:b].clone()], (1.0,), p, stats, start=a)
              for a, b in ((0, 4), (4, 10))]  # fmt: skip
    assert torch.cat(halves).tolist() == whole.tolist()  # the same cut in any chunking


@pytest.mark.parametrize("piece", [3, 4, 1 << 20])
@pytest.mark.parametrize("density", [0.1, 0.4, 0.5, 0.8])
def test_the_streamed_cut_is_the_whole_tensors(monkeypatch, piece, density):
    """The magnitude cut, computed piece by piece, keeps exactly ⌊density·n⌋ elements: those of
    a stable sort by magnitude (ties in index order), whatever the piece size."""
    from merit.merge.methods import sparsify

    monkeypatch.setattr(sparsify, "_PIECE", piece)
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(50, generator=g).bfloat16()
    theta = (theta0.float() + torch.randint(-2, 3, (50,), generator=g) * 0.25).bfloat16()
    t, cut = sparsify.magnitude_threshold(theta0, theta, density)
    delta = theta.float() - theta0.float()
    kept = sparsify.trim(delta.clone(), (t, cut), 0) != 0
    k = int(density * 50)
    order = torch.sort(-delta.abs(), stable=True).indices[:k]
    expected = torch.zeros(50, dtype=torch.bool)
    expected[order] = True
    assert torch.equal(kept, expected & (delta != 0)) and int(kept.sum()) <= k
