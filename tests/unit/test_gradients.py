"""CountSketch: linearity, invariance to parameter order and chunking, inner products."""

import math

import pytest
import torch

from merit.gradients import CountSketch, SketchSpec, mean_gradient_sketch, trainable_parameters
from merit.mixture import IGNORE, Encoded


def _named(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ("layer.0.weight", torch.randn(64, 32, generator=g)),
        ("layer.0.bias", torch.randn(64, generator=g)),
        ("head.weight", torch.randn(10, 64, generator=g)),
    ]


def test_linearity():
    cs = CountSketch(SketchSpec(dim=512, seed=3))
    a, b = _named(0), _named(1)
    combo = [(n, 2.0 * x - 0.5 * y) for (n, x), (_, y) in zip(a, b)]
    lhs = cs.sketch_named(combo)
    rhs = 2.0 * cs.sketch_named(a) - 0.5 * cs.sketch_named(b)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)


def test_order_and_chunking_invariance():
    cs = CountSketch(SketchSpec(dim=256, seed=7))
    named = _named()
    forward = cs.sketch_named(named)
    backward = CountSketch(SketchSpec(dim=256, seed=7)).sketch_named(list(reversed(named)))
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-5)
    # The same parameters cut into arbitrary chunks, visited in shuffled order, uncached.
    chunked = torch.zeros(256)
    fresh = CountSketch(SketchSpec(dim=256, seed=7), cache_limit=0)
    pieces = []
    for name, t in named:
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), 333):
            pieces.append((name, flat[start : start + 333], start))
    for name, piece, start in reversed(pieces):
        fresh.add(chunked, name, piece, offset=start)
    torch.testing.assert_close(chunked, forward, rtol=1e-5, atol=1e-4)


def test_hashes_depend_on_seed_and_name_only():
    a = CountSketch(SketchSpec(1000, 1)).hashes("w", 0, 50)
    b = CountSketch(SketchSpec(1000, 1)).hashes("w", 0, 50)
    c = CountSketch(SketchSpec(1000, 2)).hashes("w", 0, 50)
    d = CountSketch(SketchSpec(1000, 1)).hashes("v", 0, 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], d[0])
    assert a[0].min() >= 0 and a[0].max() < 1000
    assert set(a[1].tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("dim", [2**12, 2**14])
def test_inner_products_within_stated_error(dim):
    """<Sa, Sb> is unbiased with std ≤ |a||b|/sqrt(d): check |err| ≤ 5 std over random pairs."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    cs = CountSketch(SketchSpec(dim, 11))
    for trial in range(5):
        a = torch.randn(n, generator=g)
        b = 0.3 * a + torch.randn(n, generator=g)
        sa, sb = cs.sketch_named([("p", a)]), cs.sketch_named([("p", b)])
        exact = float(a.double() @ b.double())
        bound = 5 * float(a.norm() * b.norm()) / math.sqrt(dim)
        assert abs(float(sa.double() @ sb.double()) - exact) < bound, trial
        cos_exact = exact / float(a.norm() * b.norm())
        cos_sketch = float(sa @ sb) / float(sa.norm() * sb.norm())
        assert abs(cos_sketch - cos_exact) < 10 / math.sqrt(dim)


def test_mean_gradient_sketch_matches_exact_gradient():
    torch.manual_seed(0)
    vocab = 11

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)

        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": self.out(self.emb(input_ids))})()

    model = Tiny()
    ex = [
        Encoded([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]),
        Encoded([5, 6, 7], [IGNORE, 6, 7]),
        Encoded([2, 2, 9, 9, 1], [IGNORE, IGNORE, IGNORE, 9, 1]),
    ]
    spec = SketchSpec(4096, 0)
    cal = mean_gradient_sketch(model, ex, CountSketch(spec), batch_size=2, pad_id=0)
    # Exact: token-mean NLL over all answer tokens, in one batch.
    model.zero_grad()
    losses, count = 0.0, 0
    for e in ex:
        logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
        tgt = torch.tensor(e.labels[1:])
        m = tgt != IGNORE
        losses = losses + torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum")
        count += int(m.sum())
    (losses / count).backward()
    exact = CountSketch(spec).sketch_named([(n, p.grad) for n, p in trainable_parameters(model)])
    torch.testing.assert_close(cal.sketch, exact, rtol=1e-4, atol=1e-6)
    sq = sum(float(p.grad.pow(2).sum()) for _, p in trainable_parameters(model))
    assert cal.sq_norm == pytest.approx(sq, rel=1e-5)
    assert cal.tokens == count
