"""RegMean (closed form, Grams, streamed) and the per-tensor weightings fitted merges pass."""

from __future__ import annotations

import pytest
import torch
from merge_models import TINY, read_tensors
from transformers import LlamaConfig, LlamaForCausalLM

from merit.merge.arithmetic import plan_weighting
from merit.merge.errors import MergeError
from merit.merge.fitted import regmean_overrides as overrides
from merit.merge.grams import input_grams, linear_layers
from merit.merge.methods.regmean import closed_form
from merit.merge.streaming import merge_checkpoints


def _grams(k: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(3 * d, d, generator=g) * torch.rand(d, generator=g)
        out.append(x.T @ x / (3 * d))
    return out


def test_regmean_is_the_least_squares_solution_over_every_branchs_inputs():
    """W* minimises Σ_k w_k‖X_k Wᵀ − X_k W_kᵀ‖² (a = 1): its gradient there is zero."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    shares = [0.5, 0.3, 0.2]
    grams = [x.T @ x / len(x) for x in xs]
    star = closed_form(ws, grams, shares, alpha=1.0)
    grad = sum(s * (star - w) @ gm for s, w, gm in zip(shares, ws, grams))
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-10)
    moved = star + 1e-3
    loss = lambda w: sum(s * ((x @ w.T - x @ wk.T) ** 2).mean() for s, x, wk in zip(shares, xs, ws))  # noqa: E731
    assert loss(star) < loss(moved)


def test_equal_grams_give_the_token_weighted_average_and_a_0_the_diagonal_one():
    ws = [torch.randn(4, 5) for _ in range(3)]
    shares = [0.2, 0.3, 0.5]
    (g,) = _grams(1, 5, 1)
    avg = sum(s * w.double() for s, w in zip(shares, ws))
    assert torch.allclose(closed_form(ws, [g] * 3, shares, 0.9), avg, atol=1e-10)
    grams = _grams(3, 5, 2)
    diag = [torch.diagonal(gm).double() for gm in grams]
    by_feature = sum(s * w.double() * d for s, w, d in zip(shares, ws, diag)) / sum(
        s * d for s, d in zip(shares, diag)
    )
    assert torch.allclose(closed_form(ws, grams, shares, 0.0), by_feature, atol=1e-10)


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))


def test_grams_are_the_mean_outer_product_of_each_layers_unpadded_inputs():
    model = _model(0)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    grams, alias, tokens = input_grams(model, [{"input_ids": ids, "attention_mask": mask}])
    assert tokens == 11
    layers = linear_layers(model)
    assert "lm_head.weight" not in layers  # tied to the embedding
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert alias[q] == alias[k] == q and alias["model.layers.1.mlp.down_proj.weight"] != q
    seen = {}
    handle = layers[q].register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])[mask.reshape(-1).bool()].double()
    assert torch.allclose(grams[q].double(), x.T @ x / 11, atol=1e-5)


def test_streamed_regmean_equals_the_closed_form_and_other_tensors_are_task_arithmetic(
    base, branches, tmp_path
):
    states = [read_tensors(b) for b in branches]
    theta0 = read_tensors(base)
    names = [n for n in theta0 if n.endswith("proj.weight")]
    grams = []
    for k in range(3):
        per = {}
        for i, n in enumerate(names):
            (gm,) = _grams(1, theta0[n].shape[1], 100 * k + i)
            per[n] = gm
        grams.append(per)
    weights, params = [0.5, 0.3, 0.2], {"alpha": 0.7, "scale": 1.5}
    shapes = {n: tuple(t.shape) for n, t in theta0.items()}
    over = overrides(weights, params, shapes, grams)
    merge_checkpoints(base, branches, weights, tmp_path / "out", method="regmean", params=params,
                      overrides=over)  # fmt: skip
    out = read_tensors(tmp_path / "out")
    for n in names:
        ref = closed_form([s[n] for s in states], [g[n] for g in grams], weights, 0.7)
        assert torch.allclose(out[n].double(), ref, atol=1e-6, rtol=0), n
    norm = "model.norm.weight"
    ta = theta0[norm].double() + 1.5 * sum(
        w * (s[norm].double() - theta0[norm].double()) for w, s in zip(weights, states)
    )
    assert torch.allclose(out[norm].double(), ta, atol=1e-6)


def test_regmean_and_learned_without_their_data_are_refused(base, branches, tmp_path):
    for method in ("regmean", "learned"):
        with pytest.raises(MergeError, match="merge stage"):
            merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / method, method=method)
    assert not any((tmp_path / m).exists() for m in ("regmean", "learned"))


def test_per_tensor_weightings_replace_the_methods_for_their_tensors(base, branches, tmp_path):
    """A learned merge's per-tensor task-vector coefficients: θ0 + Σ λ_k δ_k for that tensor."""
    theta0, states = read_tensors(base), [read_tensors(b) for b in branches]
    up = "model.layers.0.mlp.up_proj.weight"
    lam = [0.9, -0.2, 0.4]
    over = {up: plan_weighting(lam, method="task_vector")}
    merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", method="task_vector",
                      overrides=over)  # fmt: skip
    out = read_tensors(tmp_path / "out")
    ref = (1 - sum(lam)) * theta0[up].double() + sum(
        c * s[up].double() for c, s in zip(lam, states)
    )
    assert torch.allclose(out[up].double(), ref, atol=1e-7, rtol=0)
    other = "model.layers.1.mlp.up_proj.weight"
    avg = sum(s[other].double() for s in states) / 3
    assert torch.allclose(out[other].double(), avg, atol=1e-6)
    with pytest.raises(MergeError, match="not a tensor"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "bad", method="task_vector",
                          overrides={"nope": over[up]})  # fmt: skip
