"""Exact group gradients and Hessian-vector products at θ0, for models small enough to hold
one gradient per dataset: the true-H version of the planner's predictions
(``merit.plan.prediction``).

A loss is given as *terms*: callables whose values sum to it (a dataset's token-mean NLL is the
sum over its micro-batches of NLL / N_t), so memory stays at one micro-batch's activations.
Hessian-vector products use double backward (Pearlmutter 1994): exact, no finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.lm import Encoded, pad_batch, token_nll_sum, trainable_parameters
from merit.plan.partition import canonical_labels
from merit.plan.prediction import Curvature, group_mix

LossTerms = Sequence[Callable[[], torch.Tensor]]

# Above this, holding one fp32 gradient per dataset is refused (planning.hessian).
MAX_GRADIENT_BYTES = 8 * 1024**3


def lm_terms(model, examples: Sequence[Encoded], batch_size: int, pad_id: int) -> LossTerms:
    """Terms summing to the token-mean answer NLL of ``examples`` (as in calibration)."""
    device = next(model.parameters()).device
    total = sum(e.answer_tokens for e in examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    terms = []
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s : s + batch_size]]

        def term(chunk=chunk):
            return token_nll_sum(model, pad_batch(chunk, pad_id, device)) / total

        terms.append(term)
    return terms


def _attention_for_double_backward():
    # Fused attention kernels have no double backward; the math kernel has.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
            for p in params
        ]
    )


def gradient(params: Sequence[torch.nn.Parameter], terms: LossTerms) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of Σ terms."""
    for p in params:
        p.grad = None
    loss = 0.0
    for term in terms:
        value = term()
        value.backward()
        loss += float(value.detach())
    g = flat_grad(params)
    for p in params:
        p.grad = None
    return loss, g


def hessian_vector_products(
    params: Sequence[torch.nn.Parameter], terms: LossTerms, vectors: torch.Tensor
) -> torch.Tensor:
    """H V for the Hessian H of Σ terms at the current weights; ``vectors`` is n × P."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    out = torch.zeros(vectors.shape, dtype=torch.float64)
    with _attention_for_double_backward():
        for term in terms:
            grads = torch.autograd.grad(term(), params, create_graph=True, allow_unused=True)
            pairs = [(g, p) for g, p in zip(grads, params) if g is not None]
            chunks = torch.split(vectors.to(params[0].device, params[0].dtype), sizes, dim=1)
            used = [
                c.reshape(len(vectors), *s)
                for c, s, g in zip(chunks, shapes, grads)
                if g is not None
            ]
            rows = []
            for i in range(len(vectors)):
                hv = torch.autograd.grad(
                    [g for g, _ in pairs],
                    [p for _, p in pairs],
                    grad_outputs=[u[i] for u in used],
                    retain_graph=i < len(vectors) - 1,
                    allow_unused=True,
                )
                full = []
                it = iter(hv)
                for g, p in zip(grads, params):
                    h = next(it) if g is not None else None
                    full.append(
                        torch.zeros(p.numel()) if h is None else h.reshape(-1).double().cpu()
                    )
                rows.append(torch.cat(full))
            out += torch.stack(rows)
    return out


def curvature(
    params: Sequence[torch.nn.Parameter],
    estimate: torch.Tensor,
    heldout_gradient: torch.Tensor,
    heldout_loss: float,
    hessian_terms: Sequence[LossTerms],
    tokens: Sequence[float],
    candidates: Sequence[np.ndarray],
    k: int,
    progress: bool = False,
) -> Curvature:
    """The scalars of ``planning.Curvature`` for each candidate split (group ids per dataset).

    ``estimate`` (T × P) holds each dataset's mean gradient g_t (from calibration parts kept
    apart from the held-out ones); the held-out mixture loss L_h = Σ_t π_t L_h,t (π_t = token
    share) has gradient ``heldout_gradient`` g_h; its Hessian is Σ_t π_t H_t, each H_t measured on
    ``hessian_terms[t]``. One pass over the datasets, each applying its H_t to every vector.
    """
    a = np.asarray(tokens, dtype=np.float64)
    pi = torch.tensor(a / a.sum(), dtype=torch.float64)
    est = estimate  # T × P, kept in its dtype (a float64 copy of T gradients is too big)
    gbar = (pi.to(est.dtype) @ est).double()
    gh = heldout_gradient.double()
    groups, means, weights, at = _partitions(candidates, est, a, k)
    # Σ_k w_k (ḡ_k − ḡ) = 0, so the last group's deviation (and its HVP) follows from the others.
    vectors = torch.cat([gh[None], gbar[None], *[(mu - gbar[None])[: k - 1] for mu in means]])
    quad = [0.0] * len(groups)
    cross = [0.0] * len(groups)
    g_hh_g = 0.0
    cross_joint = 0.0
    bar = tqdm(total=len(hessian_terms), desc="hessian", unit="dataset", disable=not progress)
    for t, terms in enumerate(hessian_terms):
        hv = hessian_vector_products(params, terms, vectors)
        p_t = float(pi[t])
        h_gh, h_g = hv[0], hv[1]
        g_hh_g += p_t * float(gbar @ h_g)
        cross_joint += p_t * float(gbar @ h_gh)
        row = 2
        for c, g in enumerate(groups):
            w = weights[c]
            v = means[c] - gbar[None]
            hvk = hv[row : row + k - 1]
            hvk = torch.cat([hvk, -(w[: k - 1, None] * hvk).sum(0, keepdim=True) / w[k - 1]])
            quad[c] += p_t * float((w * (v * hvk).sum(dim=1)).sum())
            cross[c] += p_t * float(means[c][g[t]] @ h_gh)
            row += k - 1
        bar.update()
    bar.close()
    quad = [quad[i] for i in at]
    cross = [cross[i] for i in at]
    return Curvature(
        loss0=heldout_loss,
        gh_g=float(gh @ gbar),
        g_hh_g=g_hh_g,
        quad=quad,
        cross=cross,
        cross_joint=cross_joint,
    )


def _partitions(candidates: Sequence[np.ndarray], est: torch.Tensor, a: np.ndarray, k: int):
    """The distinct partitions among ``candidates`` (identical ones are measured once): their
    labels, K × P group mean gradients and merge weights w_k, and each candidate's index."""
    keys = [tuple(canonical_labels(np.asarray(c), k).tolist()) for c in candidates]
    unique = list(dict.fromkeys(keys))
    groups = [np.asarray(u) for u in unique]
    mixes = [torch.tensor(group_mix(g, a, k), dtype=est.dtype) for g in groups]
    means = [(m @ est).double() for m in mixes]  # K × P per partition
    weights = [torch.tensor(np.bincount(g, weights=a, minlength=k) / a.sum()) for g in groups]
    return groups, means, weights, [unique.index(key) for key in keys]


def measure(
    model,
    examples: Sequence[Sequence[Encoded]],
    parts: Sequence[Sequence[Sequence[int]]],
    tokens: Sequence[float],
    candidates: Sequence[np.ndarray],
    k: int,
    batch_size: int,
    pad_id: int,
    hessian_examples: int,
    progress: bool = False,
) -> Curvature:
    """``curvature`` for a causal LM: dataset t's gradient from its even calibration parts, the
    held-out loss and gradient from its odd parts, H_t from the first ``hessian_examples``
    held-out examples. Refuses models whose T gradients would not fit ``MAX_GRADIENT_BYTES``."""
    params = model_parameters(model)
    n_params = sum(p.numel() for p in params)
    need = len(examples) * n_params * 4
    if need > MAX_GRADIENT_BYTES:
        raise ValueError(
            f"planning.hessian holds one gradient per dataset: {len(examples)} × {n_params:,} "
            f"parameters = {need / 1024**3:.1f} GiB (limit {MAX_GRADIENT_BYTES / 1024**3:.0f} "
            "GiB); use hessian: false (H = I from the sketches)"
        )
    model.eval()
    a = np.asarray(tokens, dtype=np.float64)
    pi = a / a.sum()
    estimate = torch.empty(len(examples), n_params)
    gh = torch.zeros(n_params, dtype=torch.float64)
    loss0 = 0.0
    hessian_terms = []
    bar = tqdm(total=len(examples), desc="gradients", unit="dataset", disable=not progress)
    for t, (ex, ps) in enumerate(zip(examples, parts)):
        est_idx = [i for j, p in enumerate(ps) for i in p if j % 2 == 0 or len(ps) == 1]
        held_idx = sorted(i for j, p in enumerate(ps) for i in p if j % 2 == 1 or len(ps) == 1)
        est = [ex[i] for i in est_idx]
        held = [ex[i] for i in held_idx]
        estimate[t] = gradient(params, lm_terms(model, est, batch_size, pad_id))[1]
        loss, g = gradient(params, lm_terms(model, held, batch_size, pad_id))
        gh += pi[t] * g.double()
        loss0 += pi[t] * loss
        hessian_terms.append(lm_terms(model, held[:hessian_examples], batch_size, pad_id))
        bar.update()
    bar.close()
    return curvature(
        params, estimate, gh, loss0, hessian_terms, a, candidates, k, progress=progress
    )


def model_parameters(model) -> list[torch.nn.Parameter]:
    return [p for _, p in trainable_parameters(model)]
