"""CountSketch: linearity, invariance to parameter order and chunking, inner products."""

import math

import pytest
import torch
from tiny_lm import TinyLM, examples

from merit.calibrate.sketch import CountSketch, SketchSpec, mean_gradient_sketch
from merit.lm import IGNORE, Encoded, trainable_parameters


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
    # The same parameters cut into arbitrary slices, visited in shuffled order.
    chunked = torch.zeros(256)
    fresh = CountSketch(SketchSpec(dim=256, seed=7))
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


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dim", [1000, 2**18])
def test_add_is_the_hash_definition(dim, batched):
    """Both fast paths (contiguous runs per chunk, the CPU's; grouped index_add_, a GPU's) add
    exactly Σ_i sign(i) x_i e_bucket(i), for slices straddling chunks and for bf16 too."""
    from merit.calibrate.sketch import CHUNK

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * CHUNK + 1234, generator=g)
    cs = CountSketch(SketchSpec(dim, 5), batched=batched)
    bucket, sign = cs.hashes("w", 0, x.numel())
    expected = torch.zeros(dim).index_add_(0, bucket, x * sign)
    out = torch.zeros(dim)
    for start in range(0, x.numel(), 150_000):  # slices that straddle chunk boundaries
        cs.add(out, "w", x[start : start + 150_000], offset=start)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    half = torch.zeros(dim)
    cs.add(half, "w", x.bfloat16())
    expected_bf16 = torch.zeros(dim).index_add_(0, bucket, x.bfloat16().float() * sign)
    torch.testing.assert_close(half, expected_bf16, rtol=1e-5, atol=1e-4)


def test_structured_gradients_keep_their_inner_products():
    """Chunks share one sign window τ and differ by a shift: equal chunks with a common mean
    (what layer-stacked weights look like) must not collide coherently."""
    from merit.calibrate.sketch import CHUNK

    g = torch.Generator().manual_seed(2)
    row = 1.0 + 0.1 * torch.randn(CHUNK, generator=g)
    dim = 2**12
    errors = []
    for seed in range(20):
        cs = CountSketch(SketchSpec(dim, seed))
        named_a = [(f"layer.{i}.weight", row.clone()) for i in range(16)]
        named_b = [(f"layer.{i}.weight", -row.clone()) for i in range(8)] + named_a[8:]
        sa, sb = cs.sketch_named(named_a), cs.sketch_named(named_b)
        exact = sum(float(x @ y) for (_, x), (_, y) in zip(named_a, named_b))
        norm = float(row.norm()) ** 2 * 16
        errors.append((float(sa.double() @ sb.double()) - exact) / norm)
    errors = torch.tensor(errors)
    assert errors.abs().max() < 5 / math.sqrt(dim)
    assert errors.pow(2).mean().sqrt() < 2 / math.sqrt(dim)


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


def _tiny_lm(seed=0, vocab=13):
    torch.manual_seed(seed)
    return TinyLM(vocab=vocab)


def _examples(n=10, seed=0, vocab=13):
    return examples(n, vocab=vocab, seed=seed)


def test_streaming_equals_accumulate_and_parts_average_to_the_sketch():
    """Post-accumulate-grad streaming gives the accumulate-then-sketch result; the token-weighted
    mean of the part sketches is the dataset sketch (folded), by linearity."""
    from merit.calibrate.sketch import fold, split_parts

    model, ex = _tiny_lm(), _examples(11)
    spec = SketchSpec(1024, 5)
    parts = split_parts(len(ex), 4, seed=5, name="d")
    acc = mean_gradient_sketch(model, ex, CountSketch(spec), 3, 0, parts=parts, fold_dim=256)
    st = mean_gradient_sketch(
        model, ex, CountSketch(spec), 3, 0, parts=parts, fold_dim=256, streaming=True
    )
    torch.testing.assert_close(st.sketch, acc.sketch, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.parts, acc.parts, rtol=1e-4, atol=1e-5)
    assert acc.sq_norm_exact and not st.sq_norm_exact
    assert st.part_tokens == acc.part_tokens and sum(st.part_tokens) == st.tokens
    w = torch.tensor(acc.part_tokens, dtype=torch.float32) / acc.tokens
    torch.testing.assert_close(
        (w[:, None] * acc.parts).sum(0), fold(acc.sketch, 256), atol=1e-5, rtol=1e-4
    )
    # Each part's sketch is that part's own token-mean gradient.
    alone = mean_gradient_sketch(model, [ex[i] for i in parts[2]], CountSketch(spec), 3, 0)
    torch.testing.assert_close(acc.parts[2], fold(alone.sketch, 256), rtol=1e-4, atol=1e-5)
    # Streaming leaves no gradient behind and removes its hooks.
    assert all(p.grad is None for p in model.parameters())
    loss = model(torch.tensor([ex[0].input_ids])).logits.sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fold_is_the_smaller_sketch():
    from merit.calibrate.sketch import fold

    named = _named()
    big = CountSketch(SketchSpec(2048, 9)).sketch_named(named)
    small = CountSketch(SketchSpec(256, 9)).sketch_named(named)
    torch.testing.assert_close(fold(big, 256), small, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        fold(big, 300)


def test_parts_depend_on_dataset_alone():
    from merit.calibrate.sketch import split_parts

    a = split_parts(17, 4, 0, "alpha")
    assert a == split_parts(17, 4, 0, "alpha")
    assert a != split_parts(17, 4, 1, "alpha") or a != split_parts(17, 4, 0, "beta")
    assert sorted(i for p in a for i in p) == list(range(17))
    assert [len(p) for p in a] == [5, 4, 4, 4]
    assert len(split_parts(3, 8, 0, "x")) == 3  # never an empty part


def test_spec_mismatch_names_the_field():
    from merit.calibrate.sketch import SpecMismatch, check_spec, spec_dict

    base = spec_dict(
        SketchSpec(4096, 0),
        layout="abc",
        base_fingerprint="f00",
        max_length=96,
        parts=4,
        part_dim=4096,
    )
    check_spec(base, dict(base))
    for key, value, words in [
        ("seed", 1, "sketch seed"),
        ("dim", 8192, "sketch dimension"),
        ("layout", "abd", "parameter layout"),
        ("base_fingerprint", "f01", "θ0 fingerprint"),
        ("loss", "sum of NLL", "loss definition"),
    ]:
        with pytest.raises(SpecMismatch, match=words) as info:
            check_spec(base, {**base, key: value})
        assert key in str(info.value)
        others = [k for k in ("seed", "dim", "layout", "base_fingerprint", "loss") if k != key]
        assert not any(f"{k} (" in str(info.value) for k in others)


def test_parameter_layout_sees_names_and_shapes():
    from merit.calibrate.sketch import parameter_layout

    a, b = _tiny_lm(0), _tiny_lm(1)
    assert parameter_layout(a) == parameter_layout(b)  # weights do not matter
    c = _tiny_lm(0, vocab=14)
    assert parameter_layout(c) != parameter_layout(a)
