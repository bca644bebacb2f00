"""Benchmark: the planner's predictions against short real runs of every candidate split.

    python bench/planning.py             # ~10-20 min on 2 busy CPU cores; prints the figures

A run on ``--datasets`` BIG-bench tasks (spread over the sorted task list) with merit's small θ0
(``--base DIR``, or the demo θ0 built for this mixture) is planned with every splitter for
K = ``--k`` groups, plus ``--random`` extra random balanced splits, and the true-H curvature
scalars are measured at θ0 (``merit.plan.curvature.measure``: gradients from the even calibration
parts, held-out loss, gradient and Hessians from the odd parts).

Then every candidate is *trained*: each group's branch starts from θ0 and takes ``--steps``
minibatch steps on its own train split, in two regimes:

* SGD with a constant step η = τ / steps, τ = the held-out line-search horizon τ* (the regime
  the quadratic theory describes: δ_k ≈ −τ ḡ_k);
* AdamW at the demo's learning rate (what ``merit train`` does through TRL; the theory's
  horizon does not apply, so only the *ranking* of candidates is compared).

The branches are merged with the plan's token weights, and on the held-out calibration parts we
measure gain = Σ_k w_k L(θ_k) − L(θ̄) and the merged loss L(θ̄), against the predictions: gain
under H = I (sketches only; units of τ²·|g|², so only its ranking is comparable), gain with the
true H and the predicted merged loss (both at τ). Reported: each candidate's numbers, and across
candidates the Spearman rank correlation and the ratio measured / predicted.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from merit.calibrate.sketch import split_parts
from merit.config import config_from_dict
from merit.context import open_context
from merit.lm import pad_batch, token_nll_sum, trainable_parameters
from merit.plan.curvature import measure
from merit.plan.splitters import (
    PlanInputs,
    gain_hessian,
    gain_identity,
    joint_loss,
    merged_loss,
    random_split,
)
from merit.run import Run

BIGBENCH = Path(os.environ.get("MERIT_BIGBENCH", "/work/shared/data/bigbench"))


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for _, p in trainable_parameters(model)])


def load_flat(model, vec: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(vec[i : i + p.numel()].view_as(p))
            i += p.numel()


def heldout_loss(model, heldout, pi, batch: int, pad: int) -> float:
    """Σ_t π_t × token-mean NLL of dataset t's held-out examples."""
    total = 0.0
    with torch.no_grad():
        for p_t, ex in zip(pi, heldout):
            n = sum(e.answer_tokens for e in ex)
            s = 0.0
            for i in range(0, len(ex), batch):
                s += float(token_nll_sum(model, pad_batch(ex[i : i + batch], pad, "cpu")))
            total += p_t * s / n
    return total


def train_branch(model, theta0, records, steps, regime, lr, batch, pad, seed) -> torch.Tensor:
    load_flat(model, theta0)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    opt = (
        torch.optim.SGD(params, lr=lr)
        if regime == "sgd"
        else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(records), (batch,), generator=g).tolist()
        chunk = [records[i] for i in idx]
        n = sum(e.answer_tokens for e in chunk)
        loss = token_nll_sum(model, pad_batch(chunk, pad, "cpu")) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return flat(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--random", type=int, default=3, help="extra random balanced splits")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per branch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--adamw-lr", type=float, default=5e-4)
    ap.add_argument("--base", default="demo", help="θ0 model directory (default: demo θ0)")
    ap.add_argument("--run-dir", default="/tmp/merit-bench-planning")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    files = sorted(BIGBENCH.glob("*.json*"))
    pick = [files[round(i * (len(files) - 1) / (args.datasets - 1))] for i in range(args.datasets)]
    cfg = config_from_dict(
        {
            "run_dir": args.run_dir,
            "model": {"path": args.base, "max_length": 256},
            "data": {
                "datasets": [
                    {"name": f.name.split(".json")[0], "path": str(f), "format": "bigbench"}
                    for f in pick
                ],
                "split": {"eval": 8, "calibration": 32, "train": 64, "seed": 0},
            },
            "calibration": {"batch_size": 16, "sketch_dim": 65536, "microbatches": 8},
            # The bench measures the curvature itself (for every candidate, extra ones too).
            "planning": {"k": args.k, "splitter": "gain", "bootstrap": 10, "hessian_examples": 8},
            "runtime": {"device": "cpu", "threads": args.threads, "progress": False},
        }
    )
    run = open_context(Run(cfg)).open()
    plan = run.executor.get("plan").to_json()
    names = [d["name"] for d in plan["datasets"]]
    tokens = np.array([d["tokens"] for d in plan["datasets"]], dtype=np.float64)
    samples = np.array([d["samples"] for d in plan["datasets"]], dtype=np.float64)
    k = plan["K"]
    cands = [(c["splitter"], np.array(c["groups"])) for c in plan["candidates"] if c["groups"]]
    rng = np.random.default_rng(1)
    cands += [(f"random#{i + 1}", random_split(samples, k, rng)) for i in range(args.random)]

    enc = run.encoded("calibration")
    cc = cfg.calibration
    parts = [split_parts(len(enc[n]), cc.microbatches, cc.seed, n) for n in names]
    model = run.base.load()
    pad = run.base.tokenizer.pad_token_id
    print(f"measuring curvature for {len(cands)} candidates ...", flush=True)
    cur = measure(
        model,
        [enc[n] for n in names],
        parts,
        tokens,
        [g for _, g in cands],
        k,
        cc.batch_size,
        pad,
        cfg.planning.hessian_examples,
    )
    tau = cur.horizon()
    if tau is None:
        raise SystemExit("no positive-curvature descent along ḡ at θ0: no natural horizon")
    # The Gram of the sketches, as the planner sees it (H = I predictions).
    from safetensors.torch import load_file

    sk = load_file(run.paths.sketches)["sketches"].double().numpy()
    x = PlanInputs.from_gram(sk @ sk.T, samples, tokens)
    heldout = [
        [enc[n][i] for i in sorted(i for j, p in enumerate(ps) for i in p if j % 2 == 1)]
        for n, ps in zip(names, parts)
    ]
    pi = tokens / tokens.sum()
    train = run.encoded("train")
    theta0 = flat(model)
    loss0 = heldout_loss(model, heldout, pi, 32, pad)
    regimes = {"sgd": tau / args.steps, "adamw": args.adamw_lr}
    results = {r: [] for r in regimes}
    for regime, lr in regimes.items():
        every = [e for n in names for e in train[n]]
        load_flat(
            model,
            train_branch(model, theta0, every, args.steps, regime, lr, args.batch_size, pad, 0),
        )
        joint = heldout_loss(model, heldout, pi, 32, pad)
        for ci, (label, groups) in enumerate(cands):
            w = np.bincount(groups, weights=tokens, minlength=k) / tokens.sum()
            thetas, branch_losses = [], []
            for j in range(k):
                recs = [e for t, n in enumerate(names) if groups[t] == j for e in train[n]]
                th = train_branch(
                    model, theta0, recs, args.steps, regime, lr, args.batch_size, pad, j
                )
                thetas.append(th)
                load_flat(model, th)
                branch_losses.append(heldout_loss(model, heldout, pi, 32, pad))
            merged = sum(float(w[j]) * thetas[j] for j in range(k))
            load_flat(model, merged)
            m_loss = heldout_loss(model, heldout, pi, 32, pad)
            results[regime].append(
                {
                    "label": label,
                    "gain_identity": gain_identity(x.gram, groups, tokens, k)[0],
                    "gain_pred": gain_hessian(cur, ci, tau),
                    "merged_pred": merged_loss(cur, ci, tau),
                    "gain": float(np.dot(w, branch_losses)) - m_loss,
                    "merged": m_loss,
                    "joint": joint,
                }
            )
            print(f"  {regime} {label}: done ({time.perf_counter() - t_start:.0f}s)", flush=True)

    print(f"\n== planner predictions vs short real runs ({time.strftime('%Y-%m-%d')}) ==")
    n_params = theta0.numel()
    print(
        f"θ0 {n_params / 1e6:.2f}M params, {len(names)} BIG-bench datasets, K={k}, "
        f"{args.steps} steps per branch (batch {args.batch_size}); held-out = odd calibration "
        f"parts; loss at θ0 {loss0:.4f}; τ* = {tau:.4g}"
    )
    print(
        f"predicted joint (same τ) {joint_loss(cur, tau):.4f}; measured joint: "
        + ", ".join(f"{r} {results[r][0]['joint']:.4f}" for r in regimes)
    )
    for regime in regimes:
        rows = results[regime]
        head = (
            f"{'candidate':<10} {'gain H=I':>9} {'gain pred':>10} {'gain meas':>10} "
            f"{'merged pred':>11} {'merged meas':>11}"
        )
        print(f"\n[{regime}, lr {regimes[regime]:.3g}]\n{head}\n" + "-" * len(head))
        for r in rows:
            print(
                f"{r['label']:<10} {r['gain_identity']:>9.4f} {r['gain_pred']:>10.5f} "
                f"{r['gain']:>10.5f} {r['merged_pred']:>11.4f} {r['merged']:>11.4f}"
            )
        gi = [r["gain_identity"] for r in rows]
        gp = [r["gain_pred"] for r in rows]
        gm = [r["gain"] for r in rows]
        mp = [r["merged_pred"] for r in rows]
        mm = [r["merged"] for r in rows]
        ratio = np.median(np.array(gm) / np.array(gp))
        print(
            f"Spearman vs measured gain: H=I {spearman(gi, gm):+.2f}, true H {spearman(gp, gm):+.2f};"
            f" median measured/predicted gain {ratio:.2f}; Spearman merged loss pred vs meas "
            f"{spearman(mp, mm):+.2f}; merged-loss spread measured {max(mm) - min(mm):.4f}, "
            f"predicted {max(mp) - min(mp):.4f}"
        )
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
